"""Nothing from a checkpoint is executed: crafted pickles in .metadata, in a .distcp byte item, in common.pt and in
rng/*.pt are refused with one line naming the file, and their payload never runs (conversion and resume)."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_srft import cli
from megatron_srft.checkpoint import manifest
from megatron_srft.checkpoint.safe_load import check_dcp_dir, load_dcp_metadata, safe_torch_load
from megatron_srft.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[2]


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _reseal(step_dir: Path) -> None:
    """Rewrite the manifests as an attacker would, so that only the allow-lists stand in the way."""
    for sub in ("model", "optimizer"):
        manifest.write_manifest(step_dir / sub)
    manifest.write_manifest(step_dir)


def _craft_metadata(model_dir: Path, marker: Path) -> None:
    md = load_dcp_metadata(model_dir)
    md.planner_data = _Payload(marker)  # a real index with one extra object inside
    with open(model_dir / ".metadata", "wb") as f:
        pickle.dump(md, f)


def test_crafted_metadata_is_refused_and_never_runs(run_copy, tmp_path):
    step = run_copy / "checkpoints" / "step_000002"
    marker = tmp_path / "pwned"
    _craft_metadata(step / "model", marker)
    _reseal(step)
    # the threat is real: torch's own reader (which Megatron's load uses) runs the payload
    from torch.distributed.checkpoint import FileSystemReader

    FileSystemReader(str(step / "model")).read_metadata()
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match=r"\.metadata: refusing to load: the pickle references posix\.system"):
        check_dcp_dir(step / "model")
    # resume's loader refuses before any tensor or model is touched
    from megatron_srft.checkpoint.training_state import load_training_checkpoint

    with pytest.raises(CheckpointError, match="posix.system"):
        load_training_checkpoint(step, [], None, rank=0)
    assert not marker.exists()


def test_convert_refuses_crafted_checkpoint_with_one_line(run_copy, tmp_path, capsys):
    step = run_copy / "checkpoints" / "step_000002"
    marker = tmp_path / "pwned"
    _craft_metadata(step / "model", marker)
    _reseal(step)
    capsys.readouterr()
    code = cli.main(["convert", "mcore-to-hf", "--ckpt", str(step), "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("srft convert: error: ") and "posix.system" in err and ".metadata" in err
    assert not marker.exists() and not (tmp_path / "hf").exists()


def test_resume_from_crafted_checkpoint_exits_with_one_line(run_copy, tmp_path, toy):
    from tests.toy_run import toy_overrides

    shutil.rmtree(run_copy / "checkpoints" / "step_000001")  # no intact checkpoint to fall back to
    step = run_copy / "checkpoints" / "step_000002"
    marker = tmp_path / "pwned"
    _craft_metadata(step / "model", marker)
    _reseal(step)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("SRFT_DEBUG", None)
    res = subprocess.run([sys.executable, "-m", "megatron_srft", "train", "--resume", "must",
                          *toy_overrides(toy, run_copy, 3)], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    errors = [ln for ln in res.stderr.splitlines() if "error" in ln.lower() and "warn" not in ln.lower()]
    assert res.returncode == 2, res.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("srft train: error: ") and "posix.system" in errors[0], errors
    assert not marker.exists()


def _evil_torch_bytes(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save([_Payload(marker)], buf)
    return buf.getvalue()


def test_crafted_byte_item_in_distcp_is_refused(run_copy, tmp_path):
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    opt = run_copy / "checkpoints" / "step_000002" / "optimizer"
    marker = tmp_path / "pwned"
    blob = _evil_torch_bytes(marker)
    (opt / "__9_0.distcp").write_bytes(blob)
    md = load_dcp_metadata(opt)
    idx = next(i for i in md.storage_data if isinstance(md.state_dict_metadata[i.fqn], BytesStorageMetadata))
    md.storage_data[idx] = _StorageInfo(relative_path="__9_0.distcp", offset=0, length=len(blob))
    with open(opt / ".metadata", "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(CheckpointError, match=r"__9_0\.distcp \(item 'optimizer.*posix\.system"):
        check_dcp_dir(opt)
    assert not marker.exists()


def test_crafted_common_pt_and_rng_are_refused(run_copy, tmp_path):
    step = run_copy / "checkpoints" / "step_000002"
    marker = tmp_path / "pwned"
    (step / "model" / "common.pt").write_bytes(_evil_torch_bytes(marker))
    with pytest.raises(CheckpointError, match=r"common\.pt: refusing to load.*posix\.system"):
        check_dcp_dir(step / "model")
    rng = step / "rng" / "rank_0.pt"
    assert set(safe_torch_load(rng)) == {"torch", "numpy", "python"}  # the real one loads
    rng.write_bytes(_evil_torch_bytes(marker))
    with pytest.raises(CheckpointError, match=r"rank_0\.pt: refusing to load"):
        safe_torch_load(rng)
    # a raw (non-zip) pickle is never loaded either
    rng.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="not a torch zip file"):
        safe_torch_load(rng)
    assert not marker.exists()


def test_real_checkpoint_passes(trained_run):
    step = trained_run / "checkpoints" / "step_000002"
    for sub in ("model", "optimizer"):
        check_dcp_dir(step / sub)
    assert manifest.verify_part(step) == []
