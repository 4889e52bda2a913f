"""The paper's evaluation sets (verl parquet layout), shipped in the repository's data/eval/ for tests and users."""

from pathlib import Path

EVAL_DATA = Path(__file__).resolve().parents[1] / "data" / "eval"
