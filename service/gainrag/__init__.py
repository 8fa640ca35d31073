"""gainrag: online RAG with a gain-trained passage selector (GainRAG, arXiv 2505.18710)."""

__version__ = "0.1.0"
