"""Load tests: Locust gRPC users (`locust -f loadtest`). The benchmark is `python -m daemons.bench`."""
