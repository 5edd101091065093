"""Rate-limit algorithms (pure) and the stores that keep their state."""
