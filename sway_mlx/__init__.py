"""The MLX backend: one mlx-lm model, LoRA views swapped in place.

``sway_mlx.backend.MLXDifferentialBackend`` is imported on demand (it imports mlx),
so importing this package stays cheap on machines without MLX. On Linux, importing this
package first gives MLX OpenBLAS for its float32 matmuls (see ``sway_common.blas``).
"""

from sway_common.blas import load_openblas_for_mlx

BLAS = load_openblas_for_mlx()
"""What MLX's CPU matmuls run on in this process: openblas, reference, missing or native."""
