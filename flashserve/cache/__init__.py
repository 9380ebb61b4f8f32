"""flashserve.cache."""
