"""kmserve bench."""
