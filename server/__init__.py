"""kmserve server."""
