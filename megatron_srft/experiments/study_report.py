"""The toy study's report: per-cell summaries over seeds, the comparison rule, and docs/toy_results.md with its
plots, written from the study's results (experiments/study.py)."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Sequence

from ..checkpoint.atomic import atomic_dir, write_text_atomic
from ..training.metrics import read_metrics
from ..training.plots import plot_compare
from .recipes import RECIPES, STAGES
from .study_plan import StudySpec, fitted_mu_schedule, recipe_run

#: the paper's claims, as the report states them
CLAIMS = {
    1: "SRFT beats SFT, GRPO, LUFFY and two-stage SFT->RL in-domain.",
    2: "SRFT generalises best out of distribution.",
    3: "SRFT's rollout entropy stays flat while GRPO's collapses.",
}
#: a difference counts when |mean_a - mean_b| > RULE_SE x sqrt(std_a^2 / n_a + std_b^2 / n_b)
RULE_SE = 2.0
#: entropy ratio end / start: "flat" inside [FLAT_LO, FLAT_HI], "collapsed" below COLLAPSED
FLAT_LO, FLAT_HI, COLLAPSED = 0.8, 1.25, 0.5
#: the out-of-distribution split tests claim 2 only when some recipe's mean gains at least this over the warm start
#: (below it no recipe learned anything there, and the split cannot separate recipes)
LEARNED_GAIN = 0.10
#: the methods published after the paper (not part of its claims), compared with SRFT and, for DFT, with SFT
NEWER = ("chord_mu", "chord_phi", "hpt", "dft")
#: "start" and "end" of a curve: the mean over its first / last EDGE_STEPS logged steps
EDGE_STEPS = 5

# --------------------------------------------------------------------------------------------- summaries


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (0 for one value); NaN for none."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def compare(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, str]:
    """(mean a - mean b, its standard error, verdict): "higher" / "lower" when the difference exceeds
    RULE_SE standard errors, else "no clear difference" (also with one seed, where the std is unknown)."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    diff = ma - mb
    se = math.sqrt(sa ** 2 / max(len(a), 1) + sb ** 2 / max(len(b), 1))
    if len(a) < 2 or len(b) < 2 or not math.isfinite(diff):
        return diff, se, "no clear difference"
    if diff > RULE_SE * se and diff > 0:
        return diff, se, "higher"
    if diff < -RULE_SE * se and diff < 0:
        return diff, se, "lower"
    return diff, se, "no clear difference"


def _edge_mean(rows: list[dict], key: str, first: bool, k: int = EDGE_STEPS) -> float:
    vals = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    vals = vals[:k] if first else vals[-k:]
    return sum(vals) / len(vals) if vals else float("nan")


def summarise_cell(spec: StudySpec, root: Path, results: dict[str, dict], recipe: str, condition: str) -> dict:
    """Per-seed numbers of one (recipe, condition) cell, plus the run dirs its curves come from."""
    cell = {"acc_id": [], "acc_ood": [], "acc_long": [], "ent_start": [], "ent_end": [], "len_start": [], "len_end": [],
            "seconds": [], "gen_tokens": [], "curve_runs": [], "stage_keys": []}
    for seed in spec.seeds:
        keys = recipe_run(spec, recipe, condition, seed)
        last = results[keys[-1]]
        cell["acc_id"].append(last["acc_id"])
        cell["acc_ood"].append(last["acc_ood"])
        cell["acc_long"].append(last.get("acc_long", float("nan")))
        cell["seconds"].append(sum(results[k]["train_seconds"] + results[k]["eval_seconds"] for k in keys))
        run = root / "runs" / keys[-1]
        rows = read_metrics(run)
        cell["ent_start"].append(_edge_mean(rows, "entropy/rollout", True))
        cell["ent_end"].append(_edge_mean(rows, "entropy/rollout", False))
        cell["len_start"].append(_edge_mean(rows, "response/length_mean", True))
        cell["len_end"].append(_edge_mean(rows, "response/length_mean", False))
        gen = 0.0
        for k in keys:
            for r in read_metrics(root / "runs" / k):
                if isinstance(r.get("response/length_mean"), (int, float)):
                    gen += r["response/length_mean"] * spec.prompts_per_step * spec.rollouts
        cell["gen_tokens"].append(gen)
        cell["curve_runs"].append(run)
        cell["stage_keys"].append(keys)
    return cell


# --------------------------------------------------------------------------------------------- the report


def _pct(xs) -> str:
    m, s = mean_std(xs)
    return "-" if not math.isfinite(m) else f"{100 * m:.1f} +/- {100 * s:.1f}"


def _num(xs, fmt="{:.3f}") -> str:
    m, s = mean_std(xs)
    return "-" if not math.isfinite(m) else (fmt + " +/- " + fmt).format(m, s)


def _ratio(cell) -> list[float]:
    return [e / s for s, e in zip(cell["ent_start"], cell["ent_end"]) if math.isfinite(s) and s > 0 and
            math.isfinite(e)]


def _timing(root: Path, results: dict[str, dict]) -> str:
    """How long the study's training took, from its results (a resumed study counts its original runs)."""
    spans = []
    for key, r in results.items():
        path = root / "runs" / key / "result.json"
        end = r.get("finished_at") or (path.stat().st_mtime if path.is_file() else None)
        if end is None or "train_seconds" not in r:
            continue
        spans.append((end - r["train_seconds"] - r.get("eval_seconds", 0.0), end))
    if not spans:
        return "on this project's 2-core CPU machine"
    text = (f"in {(max(e for _, e in spans) - min(s for s, _ in spans)) / 60:.0f} minutes of wall time on this "
            f"project's 2-core CPU machine")
    if all("cpu_seconds" in r for r in results.values()):
        cpu = sum(r["cpu_seconds"] for r in results.values())
        loads = [r["load_average"] for r in results.values() if "load_average" in r]
        text += (f" ({cpu / 60:.0f} CPU-minutes in all; the 1-minute load average at the end of each stage was "
                 f"{min(loads):.1f} to {max(loads):.1f}, 2 of it the study's own)")
    return text


def write_report(spec: StudySpec, root: Path, results: dict[str, dict], doc: Path, *, warm: dict) -> Path:
    """docs/toy_results.md (and its PNGs beside it, in DOC_STEM/) from the study's results."""
    cells = {(r, c): summarise_cell(spec, root, results, r, c) for c in spec.conditions for r in spec.recipes}
    img_dir = doc.parent / doc.stem
    images: dict[str, list[Path]] = {}
    with atomic_dir(img_dir) as tmp_img:  # the report's PNGs replace the previous report's together
        for c in spec.conditions:
            runs = {(f"{r} (RL stage)" if len(recipe_run(spec, r, c, spec.seeds[0])) > 1 else r):
                    cells[(r, c)]["curve_runs"] for r in spec.recipes}
            paths = plot_compare(runs, root / "plots" / c, title=f"{c} demonstrations")
            for p in paths:
                shutil.copyfile(p, tmp_img / f"{c}_{p.name}")
            images[c] = [img_dir / f"{c}_{p.name}" for p in paths]
    n = len(spec.seeds)
    lo, hi = spec.toy.ood_ops
    long = "acc_long" in warm
    long_col = " longer chains acc (%) |" if long else ""
    fit_mu = [r for r in spec.recipes if fitted_mu_schedule(spec, STAGES[RECIPES[r][-1]].preset)]
    claims, verdicts = _claims_text(spec, cells, warm)
    L = [
        "# Toy results: the paper's three claims, tested on the CPU toy task",
        "",
        f"Generated by `make reproduce-toy` (`python -m megatron_srft.cli.demo --reproduce`) on "
        f"{time.strftime('%Y-%m-%d')}, {_timing(root, results)}, {spec.jobs} worker processes. Everything "
        f"below, verdicts included, is written by the study from its measurements; nothing is tuned per recipe.",
        "",
        "## What was run",
        "",
        f"- **Model and task**: the toy (experiments/toy.py): a tiny Qwen2 (2 layers, hidden 128, character tokenizer) "
        f"on chains of additions and subtractions; operands 1..{spec.toy.max_operand}, every value in "
        f"[0, {spec.toy.max_value}).",
        f"- **Base model**: a random model warmed up with plain SFT for {spec.warmup_steps} steps "
        f"({spec.warmup_prompts_per_step} prompts, lr {spec.warmup_lr:g}) on the first half of the training "
        f"problems; every run starts from it. Its greedy accuracy: in-distribution {warm['acc_id']:.1%}, "
        f"out-of-distribution {warm['acc_ood']:.1%}"
        + (f", longer chains {warm['acc_long']:.1%}." if long else "."),
        f"- **Training set**: the other {spec.toy.num_train - spec.toy.num_train // 2} problems, none seen in the "
        f"warm-up, each with one demonstration. Condition `exact`: every demonstration correct. Condition `noisy`: "
        f"{spec.demo_error_rate:.0%} of them carry one arithmetic slip (one step's result off by 1-3, later "
        f"steps correct from the wrong value, so the final answer is wrong and the verifier scores the "
        f"demonstration 0), the way distilled traces are imperfect.",
        f"- **In-distribution test (ID)**: {warm['num_id']} held-out chains drawn like the training problems "
        f"(2..{spec.toy.max_ops} operations, no held-out operand). **Out-of-distribution test (OOD)**: "
        f"{warm['num_ood']} chains of the same lengths, operand and value ranges, each adding at least one "
        f"held-out operand: `+d` with d >= {spec.toy.held_out_plus_min}. That is the one difference from "
        f"training: no warm-up, training or ID problem adds such an operand (they may subtract it or reach such "
        f"values), so no model has seen the step `v+d` for these d."
        + (f" **Longer chains** (a second OOD column): {warm['num_long']} chains of {lo}..{hi} operations, longer "
           f"than any training problem, no held-out operand." if long else "")
        + f" Greedy decoding, up to {spec.max_response_length} tokens, exact-match reward on the boxed answer.",
        f"- **Budget: equal steps.** Every training stage runs {spec.steps} optimizer steps of "
        f"{spec.prompts_per_step} prompts (one mini-batch per step), lr {spec.lr:g} constant, grad clip 1.0, the "
        f"same prompts in the same order for every recipe of a seed; RL presets sample {spec.rollouts} rollouts "
        f"per prompt at temperature 1 (+ the demonstration where the preset uses it; CHORD and HPT are specified "
        f"with 8 rollouts per prompt, and get {spec.rollouts} here like every RL preset). Equal steps, not equal "
        f"tokens, because the question is what each objective makes of the same prompts, demonstrations and "
        f"updates, as in the paper's comparison; the cost differs (SFT generates nothing, SFT->RL runs two "
        f"stages) and is shown as wall time and generated tokens. `sft_then_rl` is the paper's two-stage "
        f"baseline: its SFT stage is the `sft` run of the same seed (SFT on this training set until the budget "
        f"ends), then `grpo` for {spec.steps} more steps from the SFT stage's exported model.",
        f"- **Seeds**: {n} per cell ({', '.join(map(str, spec.seeds))}: prompt order and rollout sampling; the "
        f"warm start is shared). Numbers are mean +/- sample std over seeds. `grpo` uses no demonstrations, so "
        "its runs serve both conditions.",
        "- **Presets**: as in docs/algorithms.md (`srft` = the paper's equations, `luffy` = LUFFY's released "
        "run, `grpo` = the paper's GRPO, `sft` = NLL on demonstrations, `dft` = DFT's -sg(p) log p, `chord_mu` / "
        "`chord_phi` / `hpt` = CHORD's and HPT's released runs: CHORD trains 2/3 of each step's prompts as expert "
        "rows on their demonstration alone, HPT trains a prompt on its demonstration alone when none of its "
        "rollouts is correct)."
        + (f" One study setting touches a schedule: the released CHORD-mu run decays mu from 0.9 to 0.05 over "
           f"200 steps, longer than a {spec.steps}-step stage, so the study rescales a decaying mu schedule's "
           f"warm-up + decay to span the stage's {spec.steps} steps (here: {', '.join(fit_mu)}); mu still goes "
           f"from its peak to its valley, in fewer steps. The same rule applies to every preset; it is not tuned."
           if fit_mu else ""),
        *([f"- **One-step-off rows** ({', '.join(f'`{r}`' for r in one_step_off_rows(spec))}): the same preset, "
           f"steps, prompts and seeds, but the engines run on a rank of their own and sample step n + 1 while step "
           f"n trains (rollout.placement disaggregated, max_staleness 1: each batch after the first is one step "
           f"behind the policy that trains on it). `srft train` on 2 local ranks under torchrun (1 training + 1 "
           f"engine rank), so their wall time is that of 2 processes. They are not part of the paper's claims."]
          if one_step_off_rows(spec) else []),
        "",
        f"A difference counts when it exceeds {RULE_SE:g} standard errors of the difference of means "
        f"(sqrt(s_a^2/n + s_b^2/n)); otherwise the report says \"no clear difference\". With {n} seeds this rule is "
        f"coarse: read the means and stds too. Wall times depend on whatever else the machine runs; generated "
        f"tokens do not. Entropy is the mean entropy of rollout tokens over the first and "
        f"last {EDGE_STEPS} steps (length likewise); \"flat\" means end/start within [{FLAT_LO:g}, {FLAT_HI:g}], "
        f"\"collapsed\" below {COLLAPSED:g}.",
        "",
        "## Results",
        "",
    ]
    for c in spec.conditions:
        L += [f"### Demonstrations: {c}", "",
              f"| recipe | ID acc (%) | OOD acc (%) |{long_col} rollout entropy start -> end | end / start | "
              "rollout length start -> end | wall time (s) | generated tokens |",
              "|---|---|---|" + ("---|" if long else "") + "---|---|---|---|---|",
              f"| (warm start) | {100 * warm['acc_id']:.1f} | {100 * warm['acc_ood']:.1f} |"
              + (f" {100 * warm['acc_long']:.1f} |" if long else "") + " - | - | - | - | - |"]
        for r in spec.recipes:
            cell = cells[(r, c)]
            ent = (f"{_num(cell['ent_start'])} -> {_num(cell['ent_end'])}"
                   if math.isfinite(mean_std(cell["ent_start"])[0]) else "- (no rollouts)")
            ratio = _num(_ratio(cell), "{:.2f}") if _ratio(cell) else "-"
            length = (f"{_num(cell['len_start'], '{:.1f}')} -> {_num(cell['len_end'], '{:.1f}')}"
                      if math.isfinite(mean_std(cell["len_start"])[0]) else "-")
            note = " (RL stage)" if len(recipe_run(spec, r, c, spec.seeds[0])) > 1 else ""
            L.append(f"| {r} | {_pct(cell['acc_id'])} | {_pct(cell['acc_ood'])} |"
                     + (f" {_pct(cell['acc_long'])} |" if long else "") + f" {ent}{note} | {ratio} | "
                     f"{length} | {_num(cell['seconds'], '{:.0f}')} | {_num(cell['gen_tokens'], '{:.0f}')} |")
        L.append("")
    L += ["## In short", ""]
    for k, by_condition in verdicts.items():
        L.append(f"- Claim {k} ({CLAIMS[k].rstrip('.')}): " + "; ".join(f"`{c}` demonstrations: **{v}**"
                                                          for c, v in by_condition.items()) + ".")
    L += ["", "## The claims", ""]
    L += claims
    L += _newer_text(spec, cells)
    L += _one_step_off_text(spec, cells, warm)
    L += ["## Curves", "",
          "Mean over seeds with a +/- std band; held-out accuracy is the ID split, evaluated every "
          f"{spec.eval_every} steps during training. `sft_then_rl` is drawn from its RL stage (its step 0 is the "
          "SFT stage's end); `sft` and `dft` have no rollouts, hence no entropy or length curve.", ""]
    for c in spec.conditions:
        for p in images[c]:
            L.append(f"![{c}: {p.stem}]({doc.stem}/{p.name})")
        L.append("")
    L += ["## How to read this", "",
          "This is a 2-layer model on synthetic arithmetic, trained for minutes from a short SFT warm start; the "
          "paper's setting is a 7B math model, long reasoning traces and 500 steps. The study tests whether the "
          "claimed effects appear on a task this machine can train, under an even budget and several seeds; it is not "
          "evidence about the 7B setting either way. Differences of a few points between recipes are within "
          "the seed-to-seed spread unless the verdict says otherwise.",
          "",
          "Reproduce: `make reproduce-toy` (its time is in the first paragraph), or "
          f"`python -m megatron_srft.cli.demo --reproduce --root DIR --seeds 1 2 3 --recipes "
          f"{' '.join(spec.recipes)}` (add `srft_w_sft_1 srft_w_rl_1` for the paper's two ablations, `--jobs 1` "
          "for one process); per-run metrics, exported models and `result.json` files are under "
          "`DIR/study/runs/<condition>/<stages>/seed<k>/`, and an interrupted study resumes where it stopped.", ""]
    write_text_atomic(doc, "\n".join(L))
    write_text_atomic(root / "summary.json", json.dumps(
        {f"{c}/{r}": {k: v for k, v in cells[(r, c)].items() if k not in ("curve_runs",)}
         for (r, c) in cells}, indent=1, default=str) + "\n")
    return doc


def _claims_text(spec: StudySpec, cells: dict, warm: dict) -> tuple[list[str], dict[int, dict[str, str]]]:
    """The claims section, and each claim's verdict per condition ("holds", "does not hold", "not tested")."""
    L: list[str] = []
    recipes = claim_recipes(spec)
    have = set(recipes)
    outcome: dict[int, dict[str, str]] = {k: {} for k in CLAIMS}

    def say(k: int, c: str, holds: bool | None) -> str:
        outcome[k][c] = "not tested" if holds is None else ("holds" if holds else "does not hold")
        return "Holds" if holds else "Does not hold"

    def line(c, metric, base) -> tuple[str, str]:
        diff, se, verdict = compare(cells[("srft", c)][metric], cells[(base, c)][metric])
        return verdict, f"{base}: {100 * diff:+.1f} points (se {100 * se:.1f}) -> {verdict}"

    if "srft" not in have:
        for k in CLAIMS:
            L += [f"### Claim {k}: {CLAIMS[k]}", "", "Not testable: `srft` was not part of this study.", ""]
            outcome[k] = {c: "not tested" for c in spec.conditions}
        return L, outcome
    # claim 1
    bases = [b for b in ("sft", "grpo", "luffy", "sft_then_rl") if b in have]
    L += [f"### Claim 1: {CLAIMS[1]}", ""]
    for c in spec.conditions:
        verdicts = [line(c, "acc_id", b) for b in bases]
        L.append(f"- `{c}` demonstrations, SRFT's ID accuracy minus each baseline's: "
                 + "; ".join(t for _, t in verdicts) + ".")
        beaten = [b for b, (v, _) in zip(bases, verdicts) if v == "higher"]
        notb = [b for b, (v, _) in zip(bases, verdicts) if v != "higher"]
        L.append(f"  **{say(1, c, not notb)}** here"
                 + (f": SRFT is clearly ahead of {', '.join(beaten)}" if beaten else "")
                 + (f"{'; ' if beaten else ': '}not of {', '.join(notb)}" if notb else "") + ".")
    L.append("")
    # claim 2
    others = [r for r in recipes if r != "srft"]
    L += [f"### Claim 2: {CLAIMS[2]}", ""]
    for c in spec.conditions:
        verdicts = [line(c, "acc_ood", b) for b in others]
        best = max(recipes, key=lambda r: mean_std(cells[(r, c)]["acc_ood"])[0])
        L.append(f"- `{c}` demonstrations, SRFT's OOD accuracy minus each other recipe's: "
                 + "; ".join(t for _, t in verdicts) + f". Highest OOD mean: `{best}`.")
        notb = [b for b, (v, _) in zip(others, verdicts) if v != "higher"]
        top = mean_std(cells[(best, c)]["acc_ood"])[0]
        if not top - warm["acc_ood"] >= LEARNED_GAIN:
            say(2, c, None)
            L.append(f"  **Not tested**: no recipe gains {LEARNED_GAIN:.0%} out of distribution over the warm start "
                     f"({warm['acc_ood']:.1%}; best {top:.1%}), so this split cannot separate them.")
        else:
            L.append(f"  The split is learnable here: `{best}` gains {100 * (top - warm['acc_ood']):.1f} points "
                     f"over the warm start ({warm['acc_ood']:.1%}).")
            L.append(f"  **{say(2, c, not notb)}** here"
                     + (f": SRFT is not clearly ahead of {', '.join(notb)}" if notb else "") + ".")
    L.append("")
    # claim 3
    L += [f"### Claim 3: {CLAIMS[3]}", ""]
    for c in spec.conditions:
        parts, flat, collapsed = [], None, None
        for r in recipes:
            rat = _ratio(cells[(r, c)])
            if not rat:
                continue
            m, s = mean_std(rat)
            parts.append(f"{r} {m:.2f} +/- {s:.2f}")
            if r == "srft":
                flat = FLAT_LO <= m <= FLAT_HI
            if r == "grpo":
                collapsed = m < COLLAPSED
        L.append(f"- `{c}` demonstrations, rollout entropy end / start: " + ", ".join(parts) + ".")
        if flat is None or collapsed is None:
            say(3, c, None)
            L.append("  Not testable here (srft or grpo missing).")
            continue
        start = mean_std(cells[("srft", c)]["ent_start"])[0]
        L.append(f"  Rollout entropy starts at {start:.3f} nats per token for srft (a uniform choice over the "
                 f"{spec.toy.vocab_size}-token vocabulary would be {math.log(spec.toy.vocab_size):.2f}).")
        srft_m = mean_std(_ratio(cells[("srft", c)]))[0]
        grpo_m = mean_std(_ratio(cells[("grpo", c)]))[0] if "grpo" in have else float("nan")
        diff, se, verdict = compare(_ratio(cells[("srft", c)]), _ratio(cells[("grpo", c)]))
        L.append(f"  SRFT's entropy {'stays flat' if flat else ('falls' if srft_m < FLAT_LO else 'rises')} "
                 f"({srft_m:.2f}); GRPO's {'collapses' if collapsed else 'does not collapse'} ({grpo_m:.2f}); "
                 f"SRFT's ratio minus GRPO's: {diff:+.2f} (se {se:.2f}) -> {verdict}. "
                 f"**{say(3, c, flat and collapsed)}** here.")
    L.append("")
    return L, outcome


def one_step_off_rows(spec: StudySpec) -> dict[str, str]:
    """The study's one-step-off recipes -> their on-policy counterpart (the same preset, run colocated)."""
    out = {}
    for r in spec.recipes:
        stage = STAGES[RECIPES[r][-1]]
        if stage.num_ranks > 1 and stage.preset in spec.recipes:
            out[r] = stage.preset
    return out


def claim_recipes(spec: StudySpec) -> list[str]:
    """The recipes the paper's claims compare: the study's less its one-step-off rows."""
    return [r for r in spec.recipes if STAGES[RECIPES[r][-1]].num_ranks == 1]


def _one_step_off_text(spec: StudySpec, cells: dict, warm: dict) -> list[str]:
    """One-step-off training (engines on their own rank, each batch sampled one step behind the policy that trains
    on it) against the same preset on-policy, at equal steps: does it learn, and does it learn as much?"""
    rows = one_step_off_rows(spec)
    if not rows:
        return []
    L = ["### One-step-off training (not a claim of the SRFT paper)", "",
         "The same preset, steps, prompts and seeds, with the engines on a rank of their own sampling step n + 1 "
         "while step n trains (`rollout.placement: disaggregated`, `rollout.max_staleness: 1`, 1 training + 1 "
         "engine rank; truncated importance sampling at its default cap 2). It learns when its mean gains on the "
         "warm start; the on-policy run is the reference.", ""]
    for c in spec.conditions:
        for r, base in rows.items():
            parts = []
            for metric, name in (("acc_id", "ID"), ("acc_ood", "OOD")):
                gain = mean_std(cells[(r, c)][metric])[0] - warm[metric]
                diff, se, verdict = compare(cells[(r, c)][metric], cells[(base, c)][metric])
                parts.append(f"{name} {100 * gain:+.1f} points over the warm start, {100 * diff:+.1f} (se "
                             f"{100 * se:.1f}) against on-policy -> {verdict}")
            L.append(f"- `{c}` demonstrations, `{r}`: " + "; ".join(parts) + ".")
    L.append("")
    return L


def _newer_text(spec: StudySpec, cells: dict) -> list[str]:
    """SRFT against the methods published after the paper, and DFT's own claim (it generalises better than SFT):
    stated with the same rule, not part of the paper's claims."""
    newer = [r for r in NEWER if r in spec.recipes]
    if not newer:
        return []
    L = ["### The newer methods (not claims of the SRFT paper)", ""]
    for c in spec.conditions:
        for metric, name in (("acc_id", "ID"), ("acc_ood", "OOD")):
            if "srft" in spec.recipes:
                parts = []
                for r in newer:
                    diff, se, verdict = compare(cells[("srft", c)][metric], cells[(r, c)][metric])
                    parts.append(f"{r}: {100 * diff:+.1f} points (se {100 * se:.1f}) -> {verdict}")
                L.append(f"- `{c}` demonstrations, SRFT's {name} accuracy minus each newer method's: "
                         + "; ".join(parts) + ".")
        if "dft" in spec.recipes and "sft" in spec.recipes:
            parts = []
            for metric, name in (("acc_id", "ID"), ("acc_ood", "OOD")):
                diff, se, verdict = compare(cells[("dft", c)][metric], cells[("sft", c)][metric])
                parts.append(f"{name} {100 * diff:+.1f} points (se {100 * se:.1f}) -> {verdict}")
            L.append(f"- `{c}` demonstrations, DFT minus SFT (DFT's claim: it generalises better than SFT): "
                     + "; ".join(parts) + ".")
    L.append("")
    return L
