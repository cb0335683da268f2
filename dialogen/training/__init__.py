"""Training: the fine-tuning / pre-training loop, checkpoints with exact resume."""
