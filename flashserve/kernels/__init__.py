"""flashserve.kernels."""
