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


def test_bench_async_modes_are_valid_two_rank_layouts(toy, tmp_path):
    """bench_async's three modes are the demo's RL step plus placement overrides on 2 ranks: each must stay a valid
    config and split (colocated DP 2; disaggregated 1 trainer + 1 engine rank), or the benchmark fails after the
    warm-up. No rank starts here."""
    from megatron_srft.config import load_config, to_yaml
    from megatron_srft.distributed.layout import validate_layout
    from megatron_srft.experiments.demo import rl_config
    from megatron_srft.models.arch import load_arch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_async
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    base = rl_config(toy, toy / "model", tmp_path / "run", "srft", steps=2)
    (tmp_path / "cfg.yaml").write_text(to_yaml(base))
    arch = load_arch(toy / "model")
    dp = {mode: validate_layout(load_config(str(tmp_path / "cfg.yaml"), overrides), bench_async.NUM_RANKS, arch)
          for mode, overrides in bench_async.MODES.items()}
    assert dp == {"colocated": 2, "one_step_off": 1, "on_policy": 1}
