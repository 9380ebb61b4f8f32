"""flashserve.server."""
