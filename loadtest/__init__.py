"""Load tests: Locust gRPC users (`locust -f loadtest`); the benchmark is daemons.bench."""
