"""Real-GPU validation (pytest marker ``gpu``); skipped where no NVIDIA GPU answers."""
