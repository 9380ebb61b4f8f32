"""flashserve.engine."""
