"""flashserve.layers."""
