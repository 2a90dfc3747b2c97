"""Releasing models: the federated gate, the MLflow registry, pushes to the plants' edges."""
