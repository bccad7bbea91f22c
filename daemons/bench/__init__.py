"""Benchmarks of the bundle's building blocks, run with `python -m daemons.bench.<name>`.
(They live in the product package, not in loadtest/, because Locust imports every
module under loadtest/.)"""
