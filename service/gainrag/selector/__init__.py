"""Passage selectors: score (question, candidate) pairs; the best candidates go to the generator."""
