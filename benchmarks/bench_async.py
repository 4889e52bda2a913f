"""Generation overlapping training: the same toy run on 2 ranks, colocated against disaggregated.

    python benchmarks/bench_async.py [--steps 20] [--warmup 4] [--rounds 3] [--preset srft] [--modes colocated,...]
                                     [--root runs/demo] [--set key=value ...] [--json OUT] [--record] [--dry-run]

Three runs of one toy training at equal settings, each launched as a real 2-rank job (``srft launch
--gpus-per-node 2``, i.e. torchrun, gloo, one thread per rank so the two ranks share 2 cores):

- ``colocated``: synchronous; both ranks train (DP 2) and both generate (half of the step's prompts each).
- ``one_step_off``: ``rollout.placement: disaggregated``, 1 training rank + 1 engine rank, ``rollout.max_staleness
  1``: step n + 1 is sampled while step n trains.
- ``on_policy``: the same split with ``max_staleness 0``: isolates what the overlap buys from what the split costs.

The step is the demo's (``megatron_srft.experiments.demo``): the warmed-up toy model (``make demo``'s SFT warm-up
under ``--root``, built on first use by bench_step's prepare run, ~10 min on 2 cores), 32 prompts x 7 rollouts,
64-token responses, temperature 1, lr 1e-4, one optimizer step per rollout step, no evaluation, no checkpoints.

Per mode, medians from RUN_DIR/metrics.jsonl over the steps after ``--warmup`` and before the last (one-step-off,
nothing is generated during the last step): wall s/step (``time/step``), t_generate (the engines' generation of
the step's batch), t_train (``time/train``, the trainer's update) and the trainer's busy time (``time/step`` -
``time/trainer_wait``: update, old log-probs, advantages, weight export), the idle fractions (disaggregated,
trainer: ``time/trainer_wait`` / ``time/step``, engines: ``time/engine_wait`` / ``time/step``; colocated, where
every rank alternates: training idles for ``time/rollout`` / ``time/step``, the engine for 1 - ``time/generate`` /
``time/step``), the weight sync's seconds and GB/s, and the overlap ratio max(t_generate, t_train) / t_step
(docs/benchmarks.md). The 1-minute load average before and after each run is recorded: on a shared machine the
two ranks do not get their two cores, and the numbers say so. ``--rounds`` runs every mode that many times, every
other round in reverse order; the spread between rounds is part of the result.

``--record`` writes the result into benchmarks/results.json (``runs.async``: round 1 as ``results``, the others as
``repeats``; the structure benchmarks/run.py writes); ``run()`` is what ``make bench`` calls (one round).
``--dry-run`` prints the launch commands and runs nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: mode -> the overrides that make it (on top of the demo's RL step); every mode runs on 2 ranks
MODES = {
    "colocated": [],
    "one_step_off": ["rollout.placement=disaggregated", "rollout.num_engine_ranks=1", "rollout.max_staleness=1"],
    "on_policy": ["rollout.placement=disaggregated", "rollout.num_engine_ranks=1", "rollout.max_staleness=0"],
}
NUM_RANKS = 2
#: the issue's target: with staleness 1, t_step <= 1.15 x max(t_generate, t_train) in the same run
TARGET_OVERLAP = 1 / 1.15


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _load1() -> float:
    return round(os.getloadavg()[0], 2)


def _warm_model(args) -> tuple[Path, Path]:
    """(toy dir, warm-start HF dir) under --root; built by bench_step's prepare run when absent."""
    root = Path(args.root).resolve()
    toy, start = root / "toy", root / "sft_warmup" / "hf"
    if not (toy / "toy.json").is_file() or not (start / "config.json").is_file():
        sys.path.insert(0, str(HERE))
        import bench_step  # noqa: E402  (a sibling script, imported only when the warm model must be built)

        print(f"[bench_async] building the demo's toy and SFT warm-up under {root} (once, ~10 min)", flush=True)
        with tempfile.TemporaryDirectory(prefix="bench_async.prepare.") as tmp:
            bench_step._child("prepare", bench_step.parse(["--root", str(root), "--threads", "2"]),
                              Path(tmp) / "prepare")
    return toy, start


def _config(args, toy: Path, start: Path, out: Path) -> Path:
    """The demo's RL step as one YAML (every mode adds its placement overrides on the command line)."""
    from megatron_srft.config import to_yaml
    from megatron_srft.experiments.demo import rl_config

    cfg = rl_config(toy, start, out / "run", args.preset, steps=args.steps)
    cfg.data.eval_files, cfg.train.eval_every, cfg.logging.progress_bar = [], 0, False
    path = out / "config.yaml"
    path.write_text(to_yaml(cfg))
    return path


def _command(cfg: Path, run_dir: Path, mode: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "megatron_srft", "launch", "--gpus-per-node", str(NUM_RANKS),
            "--rdzv-port", str(_free_port()), "--config", str(cfg), "--",
            f"run_dir={run_dir}", *MODES[mode], *extra]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_", "MASTER_"))}
    env.update(PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    return env


def _median(rows: list[dict], key: str):
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None


def summarize(rows: list[dict], warmup: int, mode: str) -> dict:
    """One mode's numbers from its metrics.jsonl rows (training steps only): medians over the steps after the
    warm-up and before the last one (one-step-off, nothing is generated during the last step)."""
    steps = [r for r in rows if "loss/minibatch" in r]
    kept = steps[warmup:-1] if len(steps) > warmup + 1 else steps
    t_step, t_gen, t_train = (_median(kept, f"time/{k}") for k in ("step", "generate", "train"))
    out = {"steps_measured": len(kept), "s_per_step": t_step, "t_generate": t_gen, "t_train": t_train,
           "t_old_logprob": _median(kept, "time/old_logprob"), "t_rollout": _median(kept, "time/rollout")}
    if mode == "colocated":
        # every rank alternates: its training waits for the whole rollout phase, its engine for everything else
        out["t_weight_sync"] = _median(kept, "time/sync")
        out["trainer_idle_frac"] = statistics.median(r["time/rollout"] / r["time/step"] for r in kept)
        out["engine_idle_frac"] = statistics.median(1 - r["time/generate"] / r["time/step"] for r in kept)
        out["t_trainer_busy"] = None
    else:
        out["t_weight_sync"] = _median(kept, "time/weight_sync")
        out["weight_sync_gbps"] = _median(kept, "rollout/weight_sync_gbps")
        out["t_trainer_wait"] = _median(kept, "time/trainer_wait")
        out["t_engine_wait"] = _median(kept, "time/engine_wait")
        out["trainer_idle_frac"] = statistics.median(r["time/trainer_wait"] / r["time/step"] for r in kept)
        out["engine_idle_frac"] = statistics.median(r["time/engine_wait"] / r["time/step"] for r in kept)
        out["t_trainer_busy"] = statistics.median(r["time/step"] - r["time/trainer_wait"] for r in kept)
        out["staleness_max"] = max(r.get("rollout/staleness_max", 0) for r in steps)
    # per step, then the median: both phases measured in the same step
    out["overlap_ratio"] = statistics.median(max(r["time/generate"], r["time/train"]) / r["time/step"]
                                             for r in kept) if t_gen is not None and t_train is not None else None
    if out.get("t_trainer_busy") is not None:
        out["overlap_ratio_busy"] = statistics.median(
            max(r["time/generate"], r["time/step"] - r["time/trainer_wait"]) / r["time/step"] for r in kept)
    out["reward_mean_per_step"] = [round(r.get("reward/mean", float("nan")), 3) for r in steps]
    return out


def run_mode(mode: str, cfg: Path, out: Path, args) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / mode
    cmd = _command(cfg, run_dir, mode, list(args.set))
    log = out / f"{mode}.log"
    load_before, t0 = _load1(), time.time()
    with open(log, "w") as f:  # a file, not a pipe: processes the run leaves behind must not keep us waiting
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=str(out))
    wall = time.time() - t0
    metrics = run_dir / "metrics.jsonl"
    if proc.returncode != 0 or not metrics.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"bench_async: the {mode} run failed (exit {proc.returncode}):\n{tail}")
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    result = summarize(rows, args.warmup, mode)
    result.update(wall_s=round(wall, 1), load1_before=load_before, load1_after=_load1())
    return result


def measure(args) -> dict:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"bench_async: --modes: unknown {unknown}; expected some of {sorted(MODES)}")
    toy, start = _warm_model(args)
    settings = {"preset": args.preset, "steps": args.steps, "warmup_steps": args.warmup, "ranks": NUM_RANKS,
                "threads_per_rank": 1, "overrides": list(args.set), "rounds": args.rounds,
                "settings": "demo RL step: warmed toy model, 32 prompts x 7 rollouts, 64-token responses, "
                            "temperature 1, lr 1e-4, 1 optimizer step per rollout step, fp32, no eval, no checkpoints"}
    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench_async.") as tmp:
        tmp = Path(tmp)
        cfg = _config(args, toy, start, tmp)
        for i in range(args.rounds):
            # every other round in reverse order: a machine whose load drifts favours no mode
            order = modes if i % 2 == 0 else modes[::-1]
            rnd = {"round": i + 1, "modes_order": ",".join(order), "load1_before": _load1(), "modes": {}}
            for mode in order:
                print(f"[bench_async] round {i + 1}: {mode} ...", flush=True)
                rnd["modes"][mode] = run_mode(mode, cfg, tmp / f"round{i + 1}", args)
                print(f"[bench_async] round {i + 1}: {mode}: {json.dumps(rnd['modes'][mode])[:400]}", flush=True)
            rnd["load1_after"] = _load1()
            rnd["date"] = _now()  # when the round ended (UTC)
            rounds.append(_ratios(rnd))
    return {**settings, **rounds[0], "repeats": rounds[1:]}


def _ratios(rnd: dict) -> dict:
    m = rnd["modes"]
    if "colocated" in m:
        for mode in ("one_step_off", "on_policy"):
            if mode in m and m[mode]["s_per_step"]:
                rnd[f"sync_over_{mode}_s_per_step"] = m["colocated"]["s_per_step"] / m[mode]["s_per_step"]
    if "one_step_off" in m and m["one_step_off"]["overlap_ratio"] is not None:
        rnd["one_step_off_meets_target"] = m["one_step_off"]["overlap_ratio"] >= TARGET_OVERLAP
    return rnd


def _fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def table(result: dict) -> str:
    """The Markdown table of docs/benchmarks.md: one row per round and mode."""
    lines = ["| round | mode | s/step | t_generate | t_train | trainer busy | trainer idle | engines idle | "
             "weight sync s | GB/s | max(t_gen, t_train)/t_step | load 1-min before/after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rnd in [result, *result.get("repeats", [])]:
        for mode, r in rnd["modes"].items():
            lines.append(f"| {rnd['round']} | {mode} | {_fmt(r['s_per_step'])} | {_fmt(r['t_generate'])} | "
                         f"{_fmt(r['t_train'])} | {_fmt(r.get('t_trainer_busy'))} | "
                         f"{_fmt(r['trainer_idle_frac'], '.0%')} | {_fmt(r['engine_idle_frac'], '.0%')} | "
                         f"{_fmt(r['t_weight_sync'], '.3f')} | {_fmt(r.get('weight_sync_gbps'), '.3f')} | "
                         f"{_fmt(r['overlap_ratio'])} | {r['load1_before']} / {r['load1_after']} |")
    return "\n".join(lines)


def record(result: dict, path: Path = HERE / "results.json") -> None:
    """Into benchmarks/results.json as ``runs.async``, the structure benchmarks/run.py writes."""
    sys.path.insert(0, str(HERE))
    from run import machine  # noqa: E402  (the sibling runner's machine description, one definition)

    results = json.loads(path.read_text()) if path.is_file() else {}
    first = {k: v for k, v in result.items() if k != "repeats"}
    results.setdefault("runs", {})["async"] = {
        "date": result.get("date") or _now(), "machine": machine(), "seconds": result.get("wall_s"), "status": "ok",
        "results": first, "repeats": result.get("repeats", [])}
    path.write_text(json.dumps(results, indent=1) + "\n")  # key order kept: other entries stay as written


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="srft")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=4, help="leading training steps left out of the medians")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--rounds", type=int, default=3,
                   help="run every mode this many times, every other round in reverse order (a shared machine's "
                        "load drifts: the spread between rounds is part of the result)")
    p.add_argument("--root", default=str(ROOT / "runs" / "demo"), help="make demo's root (toy + SFT warm-up)")
    p.add_argument("--set", action="append", default=[], help="config override key.sub=value (repeatable)")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--record", action="store_true", help="write the result into benchmarks/results.json")
    p.add_argument("--dry-run", action="store_true", help="print each mode's launch command; run nothing")
    return p.parse_args(argv)


def run() -> dict:
    """``make bench``: the three modes at the defaults, one round; flat numbers for benchmarks/results.json."""
    r = measure(parse(["--rounds", "1"]))
    out = {k: v for k, v in r.items() if k not in ("modes", "repeats")}
    for mode, numbers in r["modes"].items():
        out.update({f"{mode}/{k}": v for k, v in numbers.items()})
    return out


def main(argv=None) -> int:
    args = parse(argv)
    if args.dry_run:
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            print(" ".join(_command(Path("CONFIG.yaml"), Path("RUN_DIR"), mode, list(args.set))))
        return 0
    t0 = time.time()
    result = measure(args)
    result["wall_s"] = round(time.time() - t0, 1)
    print("\n" + table(result))
    for rnd in [result, *result["repeats"]]:
        print(f"round {rnd['round']}: " + ", ".join(
            f"{k} {rnd[k]:.2f}" if isinstance(rnd[k], float) else f"{k} {rnd[k]}"
            for k in ("sync_over_one_step_off_s_per_step", "sync_over_on_policy_s_per_step",
                      "one_step_off_meets_target", "load1_before", "load1_after") if k in rnd))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.record:
        record(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
