import os
import shutil

import pytest

# Tests run many small processes on a 2-core machine: one thread each keeps them from fighting.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than about a minute on 2 CPU cores (CI still runs it)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (tests/gpu, `make test-gpu`); skipped without one")


def pytest_collection_modifyitems(config, items):
    """The GPU tier is skipped (and counted) where CUDA is absent."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        import torch  # here, not at the top: only a run that collected the GPU tier asks for CUDA

        if not torch.cuda.is_available():
            for item in gpu:
                item.add_marker(pytest.mark.skip(reason="GPU tier: no CUDA device"))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    """A tiny random Qwen2 HF directory (fp32, tied embeddings, head_dim 32) shared by a test session."""
    from megatron_srft.experiments.tiny import make_tiny_hf_model

    path = tmp_path_factory.mktemp("tiny_qwen2")
    make_tiny_hf_model(path, "qwen2", seed=0)
    return path


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """The toy task (char tokenizer, tiny random Qwen2, arithmetic chains with demonstrations), small."""
    from megatron_srft.experiments.toy import ToySettings, make_toy

    return make_toy(tmp_path_factory.mktemp("toy") / "toy", ToySettings(num_train=64, num_test=8, max_ops=2))


@pytest.fixture(scope="session")
def trained_run(toy, tmp_path_factory):
    """A real 2-step SFT run (1 rank), made once: RUN_DIR with checkpoints/step_000001 and step_000002 (model/,
    optimizer/, rng/, state.json, manifests), metrics.jsonl and srft_run.json. Tests copy it (``run_copy``)."""
    from tests.dist import run_ranks
    from tests.toy_run import toy_overrides, train_toy

    run = tmp_path_factory.mktemp("ckpt_run") / "run"
    run_ranks(train_toy, 1, toy_overrides(toy, run, 2))
    return run


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A private copy of the trained run directory, free to damage."""
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst, symlinks=True)
    return dst
