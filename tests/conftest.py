import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def tiny_overrides(**extra) -> list[str]:
    """A model small enough for per-token reference loops, with the tiny preset's shape ratios."""
    base = {"model.vocab_size": 97, "model.hidden_size": 32, "model.intermediate_size": 48,
            "model.num_hidden_layers": 3, "model.num_attention_heads": 4, "model.num_key_value_heads": 2,
            "model.num_experts": 4, "data.seq_len": 16}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def root() -> Path:
    return ROOT
