"""kmserve trainer_worker."""
