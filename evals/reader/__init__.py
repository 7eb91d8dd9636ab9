"""The reader model: a small Llama trained here on the platform's own formats."""
