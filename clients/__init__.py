"""kmserve clients."""
