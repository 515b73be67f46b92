"""Prefect deployments serving the flows (manual ``demo`` and scheduled ``retrain``)."""
