"""What the command line imports before it runs anything: the command modules (the demo's is `__main__` there,
which every spawned helper process imports again; multiprocessing skips a package's `__main__.py`) load none of
Megatron, vLLM or transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("megatron.core", "vllm", "transformers")


@pytest.mark.parametrize("module", ["megatron_srft.cli", "megatron_srft.cli.demo",
                                    "megatron_srft.cli.config", "megatron_srft.cli.launch",
                                    "megatron_srft.cli.make_toy", "megatron_srft.cli.check"])
def test_importing_a_command_module_loads_no_heavy_library(module):
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"{module} imports {out} at start-up (spawned helpers re-import a __main__ module)"
