"""The trainer: train/eval loops, steps, optimiser, train state, checkpoints, sharding, metrics, sweeps."""
