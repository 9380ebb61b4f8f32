"""flashserve.models."""
