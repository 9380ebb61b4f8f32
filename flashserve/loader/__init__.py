"""flashserve.loader."""
