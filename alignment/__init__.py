"""alignment: the ML core of the RLHF pipeline (plain torch/transformers, no Prefect import).

Stages: ``data`` (preference pairs), reward models (``rewards/``), the training algorithms
(``algorithms/``: the online loop, REINFORCE, GRPO, PPO, DPO, SFT), evaluation (``evaluation/``: scoring,
the judge, gold checks, the verdict). ``tasks/``, ``flows/`` and ``deployments/`` wrap these functions
for Prefect.
"""

__version__ = "0.1.0"
