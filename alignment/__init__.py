"""alignment: the ML core of the RLHF pipeline (plain torch/transformers, no Prefect import).

Stages: ``data`` (preference pairs), reward models, REINFORCE, evaluation. ``tasks/``, ``flows/`` and
``deployments/`` wrap these functions for Prefect.
"""

__version__ = "0.1.0"
