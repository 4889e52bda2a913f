"""The benchmarks measure code that exists: a renamed function would silently drop out of bench_step's report."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _source(where: str) -> Path:
    """The file a profile row names: ours under the checkout, vLLM's and Megatron's where they are installed."""
    top = where.split("/")[0]
    if top == "megatron_srft":
        return ROOT / where
    spec = importlib.util.find_spec(top)
    assert spec is not None and spec.submodule_search_locations, f"{top} is not installed"
    return Path(list(spec.submodule_search_locations)[0]).parent / where


def _defined(path: Path) -> set[str]:
    return {n.name for n in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_bench_step_profiles_functions_that_exist():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_step
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rows = [(label, where, func) for label, where, func in bench_step.OURS]
    rows += [(label, *key) for label, key in bench_step.OVERHEADS if isinstance(key, tuple)]
    missing = [f"{label}: {func} in {where}" for label, where, func in rows
               if not _source(where).is_file() or func not in _defined(_source(where))]
    assert missing == [], missing
