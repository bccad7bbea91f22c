"""Load tests (Locust gRPC users) and the benchmark (`python -m loadtest.bench`)."""
