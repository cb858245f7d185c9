"""Networks only: they know nothing of noise schedules, data files or training."""
