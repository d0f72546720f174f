"""Entry points (train, eval, generate, demo) and the training machinery they share."""
