"""kmserve evals."""
