"""Where the paper's evaluation sets (verl parquet layout) are: the project's shared/data beside the checkout.

CI lays a copy of shared/ beside the fresh clone; SRFT_SHARED_DATA overrides the location.
"""

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    candidates = [os.environ.get("SRFT_SHARED_DATA"), _REPO.parent / "shared" / "data", _REPO / "shared" / "data"]
    for c in candidates:
        if c and (Path(c) / "math_eval.parquet").is_file():
            return Path(c)
    raise FileNotFoundError("shared/data with math_eval.parquet not found beside the checkout "
                            "(set SRFT_SHARED_DATA)")


SHARED = str(shared_data_dir())
