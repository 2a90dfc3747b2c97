"""Anchor side: the ServerApp, its strategy wrappers and MLflow tracking."""
