"""Where checkpoints live: the storage seam and its backends."""
