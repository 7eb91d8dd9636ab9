"""The trainer worker: claims jobs from the registry queue and runs them (ingest, synthesize, train_km, train_ke)."""
