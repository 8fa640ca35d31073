"""Offline training of the selector: signal jobs (``signals/``) label data, recipes
(``recipes/``) train the cross-encoder on transformers' Trainer (``trainer.py``), and plans
(``plans/*.toml``) hold the exact commands. docs/training.md describes each part."""
