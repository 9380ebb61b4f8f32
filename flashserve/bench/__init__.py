"""flashserve.bench."""
