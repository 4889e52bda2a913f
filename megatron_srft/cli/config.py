"""``srft config``: print the resolved config, or the generated reference."""

from __future__ import annotations

import sys

from ..config import load_config, markdown_reference, to_yaml
from ..distributed.layout import validate_layout


def add_arguments(p) -> None:
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--print", action="store_true", help="print the resolved config as YAML")
    p.add_argument("--markdown", action="store_true", help="print the config reference (docs/config.md)")
    p.add_argument("--world-size", type=int, default=None, help="also check the layout against this world size")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")


def main(args) -> int:
    if args.markdown:
        sys.stdout.write(markdown_reference())
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.world_size is not None:
        validate_layout(cfg, args.world_size)
    sys.stdout.write(to_yaml(cfg))
    return 0
