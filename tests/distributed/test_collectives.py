"""One home for collectives: no other package module talks to torch.distributed, and the helpers work on real
gloo ranks (NCCL's device rule is the same code path: tensors go to the group's device and come back)."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from tests.dist import run_ranks

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_srft"
ALLOWED = {"distributed/collectives.py", "distributed/groups.py"}


def _imports_torch_distributed(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("torch.distributed")]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("torch.distributed") or (
                    node.module == "torch" and any(a.name == "distributed" for a in node.names)):
                found.append(node.module)
    return found


def test_only_the_collectives_module_imports_torch_distributed():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        # Not collectives: `torch.distributed.run` and `.elastic` are torchrun's launcher (srft launch runs its agent
        # and catches its exceptions) and `torch.distributed.checkpoint` is the checkpoint file format (its
        # exception type names a failed load).
        names = [n for n in _imports_torch_distributed(path)
                 if n != "torch.distributed.run" and not n.startswith(("torch.distributed.checkpoint",
                                                                       "torch.distributed.elastic"))]
        if names and rel not in ALLOWED:
            offenders[rel] = names
    assert not offenders, offenders


def _helpers():
    from megatron_srft.distributed import collectives as c
    from megatron_srft.distributed.groups import ParallelGroups, init_distributed
    from megatron_srft.config import ParallelConfig

    groups: ParallelGroups = init_distributed(ParallelConfig())
    r = c.rank()
    out = {"device": str(c.device_of()), "rank": r, "world": c.world_size()}
    out["sum"] = c.all_reduce(torch.tensor([1.0 + r]), "sum").tolist()
    out["max"] = c.all_reduce(torch.tensor([1.0 + r]), "max").tolist()
    out["gather"] = [t.tolist() for t in c.all_gather(torch.tensor([r, 10 * r]))]
    out["bcast"] = c.broadcast(torch.tensor([float(r)] * 3), 1).tolist()
    out["obj"] = c.broadcast_object({"from": r}, 1)
    out["objs"] = c.all_gather_object(r * 2)
    out["gathered"] = c.gather_object({"r": r}, 0, groups.cpu_group)
    out["agree"] = (c.agree(r == 1), c.agree(False))
    out["floats"] = c.sum_floats([1.0, float(r)])
    out["global"] = c.global_rank(None, 1)
    c.barrier()
    return out


def test_helpers_on_two_gloo_ranks():
    a, b = run_ranks(_helpers, 2)
    for res in (a, b):
        assert res["device"] == "cpu" and res["world"] == 2
        assert res["sum"] == [3.0] and res["max"] == [2.0] and res["gather"] == [[0, 0], [1, 10]]
        assert res["bcast"] == [1.0, 1.0, 1.0] and res["obj"] == {"from": 1} and res["objs"] == [0, 2]
        assert res["agree"] == (True, False) and res["floats"] == [2.0, 1.0] and res["global"] == 1
    assert a["gathered"] == [{"r": 0}, {"r": 1}] and b["gathered"] is None
