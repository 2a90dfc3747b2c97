"""The anchor's federation page (`maxfl federation page`): plants, runs, privacy budgets, releases, Prometheus metrics."""
