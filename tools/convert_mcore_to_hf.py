#!/usr/bin/env python
"""Thin wrapper: ``python tools/convert_mcore_to_hf.py --ckpt DIR --out DIR [...]`` = ``srft convert mcore-to-hf``."""

import sys

from megatron_srft.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "mcore-to-hf", *sys.argv[1:]]))
