"""Experiment layer: configuration, the round loop, results files, checkpoints."""
