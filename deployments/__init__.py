"""Prefect deployments serving the flows (manual ``demo`` and scheduled ``retrain``)."""

import tasks  # noqa: F401  (sets Prefect's environment before Prefect is imported)
