"""Prefect flows composing the stage tasks: ``alignment-pipeline`` and one flow per stage."""

import tasks  # noqa: F401  (sets Prefect's environment before Prefect is imported)
