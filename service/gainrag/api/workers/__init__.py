"""The worker apps (``gainrag worker retrieval|selector``): one model each behind HTTP, built on
the same base as the gateway and loading nothing of it (tests/test_architecture.py)."""
