"""Offline jobs: gain-signal synthesis, selector data, selector training."""
