"""LLM backends for the pseudo-passage and the answer, and GainRAG's prompts."""
