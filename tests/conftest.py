import os

import pytest

# Tests run many small processes on a 2-core machine: one thread each keeps them from fighting.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than about a minute on 2 CPU cores (CI still runs it)")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    """A tiny random Qwen2 HF directory (fp32, tied embeddings, head_dim 32) shared by a test session."""
    from megatron_srft.models.tiny import make_tiny_hf_model

    path = tmp_path_factory.mktemp("tiny_qwen2")
    make_tiny_hf_model(path, "qwen2", seed=0)
    return path


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """The toy task (char tokenizer, tiny random Qwen2, arithmetic chains with demonstrations), small."""
    from megatron_srft.data.toy import ToySettings, make_toy

    return make_toy(tmp_path_factory.mktemp("toy") / "toy", ToySettings(num_train=64, num_test=8, max_ops=2))
