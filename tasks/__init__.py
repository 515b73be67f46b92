"""Prefect tasks: one per stage, wrapping the core functions in ``alignment`` (retries, caching, artifacts).

Tasks pass paths and configs, never models, and each stage writes a deterministic folder whose
``manifest.json`` marks it complete. See :mod:`tasks.stages`.

Importing this package (and so ``flows`` and ``deployments``, whose packages import it first) sets
Prefect's environment before Prefect itself is imported: telemetry off, and the stages' own log lines
(the ``alignment`` logger) forwarded to the Prefect UI; and glibc's allocator is told to give freed
tensor memory back (``alignment.footprint.tune_allocator``).
"""

import os


def prefect_env() -> None:
    """Telemetry off and the stages' log lines forwarded to Prefect; explicit settings are kept."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "alignment")  # stage logs show in the UI


prefect_env()

from alignment.footprint import tune_allocator  # noqa: E402

tune_allocator()  # freed tensor memory goes back to the system (see alignment.footprint)
