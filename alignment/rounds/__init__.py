"""Rounds: scheduled re-training that learns from its own outputs (iterated RLHF with on-policy pairs).

* :mod:`alignment.rounds.config` -- the ``rounds`` section (k, pairing, the labeller chain, max_rounds, store).
* :mod:`alignment.rounds.store` -- the preference store: one parquet per round with provenance, an inbox.
* :mod:`alignment.rounds.onpolicy` -- the ``samples`` and ``labels`` stages.
* :mod:`alignment.rounds.plan` -- a round's stages and their wiring.
* :mod:`alignment.rounds.report` -- the rounds report: curves across rounds, the RM on fresh on-policy pairs.
"""
