"""Dense retrieval: a bi-encoder and a FAISS inner-product index over normalised vectors."""
