"""The suite engine: the sway.yaml spec, the runner and checkpoint trajectories."""
