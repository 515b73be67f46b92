"""alignment: the ML core of the RLHF pipeline (plain torch/transformers, no Prefect import).

Stages: ``data`` (preference pairs), reward models (``rewards/``), the training algorithms
(``algorithms/``: the online loop, REINFORCE, GRPO, PPO, DPO, SFT), evaluation (``evaluation/``: scoring,
the judge, gold checks, the verdict). ``tasks/``, ``flows/`` and ``deployments/`` wrap these functions
for Prefect.
"""

import os

__version__ = "0.1.0"

# Telemetry off for the libraries this project drives, before any of them is imported: every entry point
# (``align``, the flows, the deployments, library use) imports this package first. Prefect reads
# PREFECT_SERVER_ANALYTICS_ENABLED / DO_NOT_TRACK; MLflow 3 reads MLFLOW_DISABLE_TELEMETRY or DO_NOT_TRACK=true
# (not =1). Explicit settings are kept.
TELEMETRY_OFF = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
for _name, _value in TELEMETRY_OFF.items():
    os.environ.setdefault(_name, _value)
