"""The storage kernel of kmserve: SQL registry, adapter blob store, job queue and LoRA arithmetic.

Imports no torch at module level; tensor work loads torch lazily.
"""
