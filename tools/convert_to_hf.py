#!/usr/bin/env python
"""Thin entry point: `complexity-dist convert to-hf ...`."""
import sys

from complexity_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "to-hf", *sys.argv[1:]]))
