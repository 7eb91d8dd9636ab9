"""kmserve engines: generation with many LoRA adapters over one base model.

`base` holds the interface (`Engine`, requests, results, `select_engine`) and imports no torch; `hf` is the
transformers + PEFT engine (CPU or GPU), `vllm` the GPU engine, `factory.create_engine` builds the configured one,
and `tiny_model` builds the default model used until a trained one replaces it.
"""
