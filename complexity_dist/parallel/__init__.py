"""How the model is spread over processes: process groups, the DeepSpeed engine (ZeRO 0-3)."""
