"""Pomona's worker: one process per node, holding one stage of the model and its KV caches."""
