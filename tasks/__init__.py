"""Prefect tasks: one per stage, wrapping the core functions in ``alignment`` (retries, caching, artifacts).

Tasks pass paths and configs, never models, and each stage writes a deterministic folder whose
``manifest.json`` marks it complete. See :mod:`tasks.stages`.
"""
