#!/usr/bin/env python3
"""Tokenize text into WebDataset shards: the same as `complexity-dist prepare-data` (see --help)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from complexity_dist.data.prepare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
