"""sway-mlx: did this LoRA adapter really change the model, beyond a random adapter of its shape?

This package holds what is measured and how it is judged; it imports neither mlx nor
torch. The backends live in ``sway_mlx`` and ``sway_hf``.
"""

__version__ = "0.1.0"
