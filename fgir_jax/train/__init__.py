"""Training stages, train state and checkpoints."""
