"""The stage benchmarks, run as modules from the repository root (``python -m
benchmarks.bench_<name>``; ``make bench``); processes come from :mod:`gainrag_harness`."""
