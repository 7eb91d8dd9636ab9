"""kmserve engines."""
