"""Load tests of ``POST /answer`` (Locust): ``python -m loadtests.run``, ``make loadtest``."""
