#!/usr/bin/env python
"""Thin entry point: `complexity-dist convert from-hf ...`."""
import sys

from complexity_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "from-hf", *sys.argv[1:]]))
