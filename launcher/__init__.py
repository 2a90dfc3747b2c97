"""The local federation: anchor (MLflow, SuperLink) and plants (SuperNodes) as real processes on loopback."""
