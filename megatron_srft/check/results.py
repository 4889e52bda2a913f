"""What a check reports: its lines (:class:`Result`), how a check says it does not apply (:class:`Skip`), and the
``--out`` JSON file the run's results are appended to."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.atomic import write_text_atomic
from ..errors import UserError, first_line

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


class Skip(Exception):
    """Raised inside a check: the check does not apply here (the message says why)."""


class PeerFailed(Exception):
    """This rank's part went well, another rank's failed (its reason is the one printed)."""


@dataclass
class Result:
    id: str
    name: str
    status: str
    detail: str
    numbers: dict = field(default_factory=dict)
    seconds: float = 0.0  # wall time of the check on this rank (the line's share when a check has several)

    def line(self) -> str:
        return f"{self.id:<3}{self.name:<16}{self.status:<6}{self.detail}"


def short_count(n: float) -> str:
    """1.54B, 427M, 12.3K."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:g}"


def fmt_seconds(t: float) -> str:
    return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"


def one_line(exc: BaseException) -> str:
    first = first_line(exc, empty="")
    name = exc.__class__.__name__
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        first = "CUDA out of memory"
    return (f"{name}: {first}" if first else name)[:240]


# ---------------------------------------------------------------------------------------- the --out file


def _card_key(card: str) -> str:
    return "check/" + "".join(c if c.isalnum() else "_" for c in card.lower()).strip("_")


def read_results_file(path: Path) -> Any:
    """The ``--out`` file's JSON: a list, or a benchmarks file (a dict with ``runs``); [] when it does not exist.
    Read once before the checks too, so that a file we could not append to fails the command before the run."""
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text() or "[]")
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); pass another --out") from None
    if isinstance(data, list) or (isinstance(data, dict) and isinstance(data.get("runs"), dict)):
        return data
    raise UserError(f"{path}: expected a JSON list (or a benchmarks file with 'runs'); pass another --out")


def append_results(path: Path, entry: dict) -> None:
    """Append ``entry`` to the JSON list in ``path`` (created if missing), or, for a benchmarks file
    (``{"runs": {...}}``), set ``runs["check/<card>"]`` in benchmarks/run.py's format. Written to a temporary
    file and renamed, so an interrupted write never leaves a half file."""
    data = read_results_file(path)
    if isinstance(data, dict):
        data["runs"][_card_key(entry["card"])] = {
            "date": entry["date"], "machine": entry["machine"], "seconds": entry["seconds"],
            "status": "ok" if entry["summary"][FAIL] == 0 else "failed", "results": entry}
        text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    else:
        data.append(entry)
        text = json.dumps(data, indent=1) + "\n"
    write_text_atomic(path, text)

