"""The machinery every command shares: base models, the training loop and its checkpoints, sampling,
generation, evaluation artifacts and the SNI metric."""
