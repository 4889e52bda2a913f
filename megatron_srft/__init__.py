"""megatron-srft: SRFT (Supervised Reinforcement Fine-Tuning) at Megatron scale."""

from .version import __version__

__all__ = ["__version__"]
