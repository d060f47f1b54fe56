"""Training PE-Rank's projector at small scale (``pe-rank train``).

Stage 1 (alignment) teaches the projector to produce a soft token the frozen LLM can read
back as the passage text; stage 2 (ranking) trains the same soft tokens with ListMLE on
the exact scores the ranker decodes with (``s_i = h . e_i``). The encoder and the LLM stay
frozen. The prompt, the model and the weights come from :mod:`pe_rank.core`; this package
only adds the losses, the data, the loop and the checkpoint writer.
"""
