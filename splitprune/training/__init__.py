"""Split training: the shared step, schedules, the trainer, checkpoints."""
