#!/usr/bin/env python
"""Thin wrapper: ``python tools/convert_hf_to_mcore.py --hf DIR --out DIR [...]`` = ``srft convert hf-to-mcore``."""

import sys

from megatron_srft.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "hf-to-mcore", *sys.argv[1:]]))
