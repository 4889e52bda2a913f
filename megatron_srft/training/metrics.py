"""Run metrics: ``RUN_DIR/metrics.jsonl`` (one line per step, the record of truth), a console progress line, and
optional sinks from :data:`SINKS`: TensorBoard (``RUN_DIR/tensorboard``) and Weights & Biases (online, or offline
under ``RUN_DIR/wandb`` for clusters without egress: `wandb sync` it later).

Only the logging rank writes. Values are plain floats; the step's wall-clock phases are recorded as
``time/<phase>`` so a user can see where a step's time goes (rollout, reward, old_logprob, train, sync, ...).
A sink is a class with ``log(step, row)`` and ``close()``; adding one is a class and a row in :data:`SINKS`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

from ..checkpoint.atomic import write_text_atomic
from ..errors import ConfigError, UserError, first_line


class PhaseTimer:
    """``with timer("rollout"): ...`` accumulates seconds per phase for the current step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def as_metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()}


def _optional(module: str, field: str):
    try:
        return importlib.import_module(module)
    except Exception:  # noqa: BLE001 - the package is optional
        raise ConfigError(f"{field}: needs the '{module.split('.')[0]}' package "
                          f"(pip install 'megatron-srft[logging]')") from None


class TensorBoardSink:
    """Scalars into ``RUN_DIR/tensorboard`` (read them with TensorBoard, or its event reader)."""

    def __init__(self, run_dir: Path, cfg, run_config: dict, run_id: Optional[str]) -> None:
        writer = _optional("torch.utils.tensorboard", "logging.tensorboard").SummaryWriter
        self.writer = writer(str(run_dir / "tensorboard"))

    def log(self, step: int, row: dict) -> None:
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run: ``logging.wandb_project`` / ``_entity`` / ``_run_name``; ``wandb_mode: offline``
    writes it under ``RUN_DIR/wandb`` (`wandb sync RUN_DIR/wandb/offline-run-*` later). The W&B run id is the
    run's own id, so a resumed run continues the same W&B run (steps it already logged are not logged again)."""

    def __init__(self, run_dir: Path, cfg, run_config: dict, run_id: Optional[str]) -> None:
        wandb = _optional("wandb", "logging.wandb")
        self.run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity,
                              name=cfg.wandb_run_name or run_dir.name, mode=cfg.wandb_mode, dir=str(run_dir),
                              config=run_config, id=run_id, resume="allow" if run_id else None, reinit=True)
        self.last_step = getattr(self.run, "step", 0) or 0

    def log(self, step: int, row: dict) -> None:
        if step < self.last_step:  # W&B rejects steps below its own; a resume re-logs the steps after the ckpt
            return
        self.last_step = step
        self.run.log({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        self.run.finish()


#: logging config switch -> sink class (names and docs follow this table)
SINKS = {"tensorboard": TensorBoardSink, "wandb": WandbSink}


class MetricsLogger:
    """metrics.jsonl, the console line, and the sinks the logging config switches on (logging rank only)."""

    def __init__(self, run_dir: str | Path, *, enabled: bool, total_steps: int, logging_cfg=None,
                 progress_bar: bool = True, log_every: int = 1, run_config: Optional[dict] = None,
                 run_id: Optional[str] = None) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.progress_bar = logging_cfg.progress_bar if logging_cfg is not None else progress_bar
        self.log_every = logging_cfg.log_every if logging_cfg is not None else log_every
        self.path = Path(run_dir) / "metrics.jsonl"
        self.sinks: list = []
        self._t0 = time.time()
        self._first_step: Optional[int] = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for name, sink in SINKS.items():
            if logging_cfg is not None and getattr(logging_cfg, name):
                self.sinks.append(sink(Path(run_dir), logging_cfg, run_config or {}, run_id))

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps that the restored checkpoint had not reached (a killed run's tail).

        A torn last line (the run was killed while writing it) is dropped with a warning; the file is rewritten
        to a temporary sibling and renamed, so a kill during the rewrite leaves the old or the new file whole.
        """
        if not self.enabled or not self.path.exists():
            return
        rows = parse_metrics_lines(self.path)
        kept = [json.dumps(r) for r in rows if r["step"] <= step]
        write_text_atomic(self.path, "".join(ln + "\n" for ln in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in sorted(metrics.items())}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for sink in self.sinks:
            sink.log(step, row)
        if self._first_step is None:
            self._first_step = step
            self._t0 = time.time()
        if step % self.log_every == 0 or step == self.total_steps:
            self._print(step, row)

    def _print(self, step: int, row: dict) -> None:
        done = step - (self._first_step or 0)
        elapsed = time.time() - self._t0
        remaining = self.total_steps - step
        eta = elapsed / max(done, 1) * remaining if done else float("nan")
        keys = ["reward/mean", "accuracy/rollout", "loss/total", "entropy/rollout", "entropy/demo", "weight/sft_mean",
                "weight/rl_mean", "response/length_mean", "eval/accuracy"]
        parts = [f"{k.split('/')[-1] if k != 'eval/accuracy' else 'eval_acc'}={row[k]:.4g}" for k in keys
                 if isinstance(row.get(k), (int, float))]
        width = 20
        filled = int(width * step / max(self.total_steps, 1))
        bar = "#" * filled + "." * (width - filled)
        eta_s = "?" if math.isnan(eta) else f"{eta:.0f}s"
        if self.progress_bar:
            print(f"[{bar}] step {step}/{self.total_steps} eta {eta_s} | " + " ".join(parts), file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def _clean(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v


def parse_metrics_lines(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl. A torn LAST line (a kill mid-write: not complete JSON) is dropped with a warning;
    a bad line elsewhere is a one-line error naming the file and line."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    rows = []
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # incomplete JSON: torn only when last
            if i == last:
                print(f"[srft] warning: {path}:{i + 1}: dropping a torn last line (the run was stopped while "
                      f"writing it)", file=sys.stderr, flush=True)
                break
            raise UserError(f"{path}:{i + 1}: not a metrics row ({first_line(e, 120)})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):  # complete, but not ours: not torn
            raise UserError(f"{path}:{i + 1}: not a metrics row (complete JSON without an integer 'step')")
        rows.append(row)  # (a complete last row without its newline is kept: the write got that far)
    return rows


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (is this a run directory?)")
    return parse_metrics_lines(path)
