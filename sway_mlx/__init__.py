"""The MLX backend: one mlx-lm model, LoRA views swapped in place.

``sway_mlx.backend.MLXDifferentialBackend`` is imported on demand (it imports mlx),
so importing this package stays cheap on machines without MLX. On Linux, importing this
package first gives MLX OpenBLAS for its float32 matmuls (see ``sway_mlx.platform_fixes``).
"""

from sway_mlx.platform_fixes import load_openblas

BLAS = load_openblas()
"""What MLX's CPU matmuls run on in this process: openblas, reference, missing, off or native."""
