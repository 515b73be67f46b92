"""Prefect tasks: one per stage, wrapping the core functions in ``alignment`` (retries, caching, artifacts).

Tasks pass paths and configs, never models, and each stage writes a deterministic folder whose
``manifest.json`` marks it complete. See :mod:`tasks.stages`.

Importing this package (and so ``flows`` and ``deployments``, whose packages import it first) sets
Prefect's environment before Prefect itself is imported: telemetry off (``alignment.TELEMETRY_OFF``, set
by importing ``alignment``), the stages' own log lines (the ``alignment`` logger) forwarded to the Prefect
UI, and a temporary Prefect server's start-up allowed :data:`EPHEMERAL_STARTUP_TIMEOUT_S` (Prefect's 20 s
default is exceeded on a busy machine); and glibc's allocator is told to give freed tensor memory back
(``alignment.footprint.tune_allocator``).
"""

import os

import alignment  # noqa: F401  (telemetry off: alignment.TELEMETRY_OFF)

EPHEMERAL_STARTUP_TIMEOUT_S = 180
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


def prefect_env() -> None:
    """Stage log lines forwarded to Prefect and a generous start-up timeout for a temporary server;
    explicit settings are kept."""
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "alignment")  # stage logs show in the UI
    os.environ.setdefault(STARTUP_TIMEOUT_ENV, str(EPHEMERAL_STARTUP_TIMEOUT_S))


prefect_env()

from alignment.footprint import tune_allocator  # noqa: E402

tune_allocator()  # freed tensor memory goes back to the system (see alignment.footprint)
