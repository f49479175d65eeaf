"""Training infrastructure used by the recipes: process groups, data order, checkpoints."""
