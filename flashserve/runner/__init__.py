"""flashserve.runner."""
