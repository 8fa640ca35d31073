"""Quality metrics and the evaluation harness."""
