"""The online algorithms by name: what ``align <name>`` runs and ``align compare algorithms=[...]`` accepts.

An entry names the module that defines the algorithm and, in it, its config class (a subclass of
``alignment.algorithms.online.OnlineConfig`` whose ``section`` is the name), its ``train_<name>(config,
out_dir, *, runs_root, stop_after, progress)`` and ``plan_<name>(config, runs_dir)``. The module is
imported only when one of them is asked for, so building the command line imports no training code
(and this module imports no training module: ``tests/test_layout.py``'s rule holds).

Adding an algorithm is one :func:`register_algorithm` call (or one entry in :data:`ALGORITHMS`); the
CLI builds a subcommand for every entry and ``align compare`` runs any of them on its equal budget.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AlgorithmSpec:
    """One online algorithm: ``module`` and, in it, the names of its config class, train and plan functions."""

    name: str
    module: str
    config: str
    train: str
    plan: str
    help: str
    description: str = ""
    epilog: str = ""

    def _attr(self, name: str) -> Any:
        return getattr(importlib.import_module(self.module), name)

    @property
    def config_cls(self) -> type:
        return self._attr(self.config)

    @property
    def train_fn(self) -> Callable[..., Any]:
        return self._attr(self.train)

    @property
    def plan_fn(self) -> Callable[..., Any]:
        return self._attr(self.plan)

    @property
    def section(self) -> str:
        return self.config_cls.model_fields["section"].default


ALGORITHMS: dict[str, AlgorithmSpec] = {}


def register_algorithm(spec: AlgorithmSpec) -> AlgorithmSpec:
    """Add ``spec`` under its name (another spec under the same name is an error)."""
    if spec.name in ALGORITHMS and ALGORITHMS[spec.name] != spec:
        raise ValueError(f"algorithm {spec.name!r} is already registered ({ALGORITHMS[spec.name].module})")
    ALGORITHMS[spec.name] = spec
    return spec


def get_algorithm(name: str) -> AlgorithmSpec:
    """The algorithm registered under ``name``; a ValueError naming the known ones otherwise."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(sorted(ALGORITHMS))}") from None


register_algorithm(AlgorithmSpec(
    "reinforce", "alignment.algorithms.reinforce", "ReinforceConfig", "train_reinforce", "plan_reinforce",
    help="fine-tune the policy with REINFORCE against a reward model",
    description="REINFORCE with a moving-average (or EMA / RLOO / GRPO / no) baseline, the whole completion as one "
    "action (Ahmadian et al. 2024). Logs reward, KL, entropy, length, EOS rate, distinct-n and repetition every "
    "step, stops on collapse, checkpoints atomically; re-running the same command resumes.",
    epilog="examples:\n  align reinforce --rm runs/rm/scalar-<hash> --data runs/data/demo-<hash>\n"
    "  align reinforce --rm RM --data DATA baseline=rloo samples_per_prompt=4 kl_beta=0.05"))
register_algorithm(AlgorithmSpec(
    "ppo", "alignment.algorithms.ppo", "PPOConfig", "train_ppo", "plan_ppo",
    help="fine-tune the policy with PPO against a reward model",
    description="PPO in the InstructGPT / trlx form: a value head on the policy, per-token KL rewards with the "
    "reward model's score at the last token, GAE, clipped policy and value losses, several epochs per batch, "
    "optional adaptive KL. Same rollouts, guard, held-out evaluations, checkpoints and resume as reinforce.",
    epilog="examples:\n  align ppo --rm runs/rm/scalar-<hash> --data runs/data/demo-<hash> steps=40\n"
    "  align ppo --rm RM --data DATA ppo_epochs=2 adaptive_kl=true kl_target=4"))
register_algorithm(AlgorithmSpec(
    "grpo", "alignment.algorithms.grpo", "GRPOConfig", "train_grpo", "plan_grpo",
    help="fine-tune the policy with GRPO (group-normalised advantages, token-level loss)",
    description="GRPO (Shao et al. 2024): k samples per prompt (default 4), each one's advantage its reward "
    "normalised within its group, the clipped surrogate averaged over the batch's completion tokens, no KL term "
    "by default (kl_beta=0). REINFORCE's rollouts, reward components, guard, evaluations, checkpoints and resume.",
    epilog="examples:\n  align grpo --rm runs/rm/scalar-<hash> --data runs/data/demo-<hash> steps=40\n"
    "  align grpo --data DATA rewards='[{kind: gold}, {kind: length, max_tokens: 64, buffer: 16}]'\n"
    "  align grpo --rm RM --data DATA baseline=dr_grpo loss_agg=seq_mean_token_sum_norm"))
