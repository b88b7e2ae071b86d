"""Training: the loop, schedule, checkpoints, metrics (tokens/s, MFU), MLflow tracking, fault handling."""
