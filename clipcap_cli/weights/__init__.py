"""The released models and their files: registry, verified downloads, checkpoints, the backbones' weights."""
