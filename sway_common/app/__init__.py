"""The application layer: the CLI, platform pick, demo, checkpoints and watch.

The only layer that imports a backend (sway_mlx, sway_hf) or click.
"""
