"""The MLX backend: one mlx-lm model, LoRA views swapped in place.

``sway_mlx.backend.MLXDifferentialBackend`` is imported on demand (it imports mlx),
so importing this package stays cheap on machines without MLX.
"""
