"""`tc train`: initialisation, losses, the sparse training step, optimisers, the shuffling loader
over the activation cache, checkpoints and the resumable training loop."""
