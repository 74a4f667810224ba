"""The training workshop: optimizers, losses, the trainer and the training stages."""
