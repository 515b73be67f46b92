"""What every online policy-optimisation stage shares (REINFORCE now; PPO and REINFORCE++ next).

* Checkpoints with exact resume: policy weights, optimizer, every process's RNG state and the
  trainer's own state in one atomic folder (``checkpoints/step-NNNNNN``), the newest ``keep`` kept
  plus any the caller protects (the last healthy one).
* The metrics log (``metrics.jsonl``, one JSON line per step) cut back to the checkpoint a resumed
  run restarts from, and the training curves drawn from it.
* The collapse guard: the known failure on this task is a policy emitting one symbol until the
  length limit while the reward model's score climbs, so a run stops when distinct-2 falls or the
  repetition rate rises past limits for ``patience`` consecutive steps.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignment.io import atomic_directory, write_json

CKPT_DIR = "checkpoints"
METRICS = "metrics.jsonl"
HELDOUT = "heldout.jsonl"  # one line per held-out evaluation (the over-optimisation curves)


class CollapseDetected(RuntimeError):
    """The collapse guard stopped the run; the last healthy checkpoint is kept."""


class ResumeError(ValueError):
    """A checkpoint cannot be resumed as launched (the message says why)."""


# --------------------------------------------------------------------------------------------
# Collapse guard
# --------------------------------------------------------------------------------------------
@dataclass
class CollapseGuard:
    """Healthy = distinct-2 >= ``min_distinct2`` and repetition <= ``max_repetition``; ``patience``
    unhealthy steps in a row stop the run. ``streak`` is checkpointed with the trainer state."""

    min_distinct2: float
    max_repetition: float
    patience: int
    streak: int = 0

    def update(self, health: dict[str, float]) -> bool:
        """Record one step's text health; True when it is healthy."""
        healthy = health["distinct2"] >= self.min_distinct2 and health["repetition"] <= self.max_repetition
        self.streak = 0 if healthy else self.streak + 1
        return healthy

    def check(self, health: dict[str, float], step: int, last_healthy: str | None, sample: str) -> None:
        """Raise :class:`CollapseDetected` once the unhealthy streak reaches ``patience``."""
        if self.streak >= self.patience:
            raise CollapseDetected(
                f"collapse guard: distinct-2 {health['distinct2']:.2f} (min {self.min_distinct2}) / repetition "
                f"{health['repetition']:.2f} (max {self.max_repetition}) unhealthy for {self.streak} steps at "
                f"step {step}; last healthy checkpoint: {last_healthy or 'none (the starting policy)'}. "
                f"Sample: {sample[:120]!r}")


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint (written atomically, so complete means present)."""
    folder = out_dir / CKPT_DIR
    if not folder.is_dir():
        return None
    for partial in folder.glob(".step-*.tmp-*"):  # left by a kill during a checkpoint write
        shutil.rmtree(partial, ignore_errors=True)
    done = sorted(p for p in folder.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file())
    return done[-1] if done else None


def save_checkpoint(out_dir: Path, step: int, policy, optimizer, state: dict[str, Any], keep: int = 2,
                    rng: dict[str, Any] | None = None) -> Path:
    """Policy weights, optimizer, RNG states and trainer state, in one atomic folder rename.

    ``rng``: the RNG states to store (``{"ranks": [...]}`` for a data-parallel run); this process's by
    default. ``state["protected"]``: checkpoint names never deleted by the ``keep`` rule.
    """
    from safetensors.torch import save_model

    target = out_dir / CKPT_DIR / f"step-{step:06d}"
    with atomic_directory(target) as tmp:
        save_model(policy, str(tmp / "policy.safetensors"))  # handles tied embeddings
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng if rng is not None else rng_state(), tmp / "rng.pt")
        write_json(tmp / "state.json", {"step": step, **state})  # last: marks the checkpoint complete
    for old in sorted((out_dir / CKPT_DIR).glob("step-*"))[:-keep]:
        if old.name != target.name and old.name not in state.get("protected", []):
            shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(ckpt: Path, policy, optimizer, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Restore weights, optimizer and this process's RNG; returns the trainer state saved with them."""
    from safetensors.torch import load_model

    load_model(policy, str(ckpt / "policy.safetensors"))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=False))
    rng = torch.load(ckpt / "rng.pt", weights_only=False)
    ranks = rng.get("ranks", [rng])  # a data-parallel run keeps every process's state
    if len(ranks) != world:
        raise ResumeError(f"{ckpt} was written by {len(ranks)} process(es); resume it with the same number "
                          f"(this launch has {world}) so that every process continues its own sampling")
    set_rng_state(ranks[rank])
    return json.loads((ckpt / "state.json").read_text())


# --------------------------------------------------------------------------------------------
# Metrics log and curves
# --------------------------------------------------------------------------------------------
def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (written after the checkpoint a resumed run restarts from)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):  # a line cut short by a kill
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


CURVE_KEYS = ("reward", "rm_reward", "kl", "length", "eos_rate", "distinct2", "repetition", "entropy")


def plot_curves(metrics_path: Path, png: Path, keys: tuple[str, ...] = CURVE_KEYS) -> None:
    """One panel per metric against the step (2 rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    cols = (len(keys) + 1) // 2
    fig, axes = plt.subplots(2, cols, figsize=(4 * cols, 6), squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, key in zip(axes.flat, keys, strict=False):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows], marker=".")
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Prompt order
# --------------------------------------------------------------------------------------------
@dataclass
class PromptSampler:
    """Batches of prompt indices from a seeded permutation per epoch; ``epoch`` and ``position`` are
    checkpointed, so a resumed run draws exactly the batches an uninterrupted one would."""

    n: int
    seed: int
    epoch: int = 0
    position: int = 0

    def next(self, batch_size: int) -> np.ndarray:
        """The next ``batch_size`` indices; a new epoch (a new permutation) when the current one runs short."""
        if self.position + batch_size > self.n:
            self.epoch, self.position = self.epoch + 1, 0
        order = np.random.default_rng(self.seed + self.epoch).permutation(self.n)
        idx = order[self.position:self.position + batch_size]
        self.position += batch_size
        return idx


# --------------------------------------------------------------------------------------------
# Over-optimisation: the proxy rises while the truth does not (Gao et al. 2023)
# --------------------------------------------------------------------------------------------
class OverOptimisationDetected(RuntimeError):
    """The over-optimisation alarm stopped the run (alarm_action='stop'); ``best/`` is kept."""


def overoptimisation_alarm(history: list[dict[str, Any]], window: int, gold_margin: float,
                           rm_margin_sd: float) -> str | None:
    """A warning when, over the last ``window`` held-out evaluations, the proxy reward rose while gold
    accuracy fell by more than ``gold_margin`` or an independent reward model fell by more than
    ``rm_margin_sd`` of its standard deviation over the prompts at the first evaluation; else None.

    history: one dict per evaluation, oldest first, with ``step``, ``proxy`` (mean reward of the model
    trained against), ``independent`` ({name: mean}), ``independent_std`` ({name: std}) and ``gold``
    (accuracy or None).
    """
    if len(history) < max(window, 2):
        return None
    first, last = history[-window], history[-1]
    if last["proxy"] <= first["proxy"]:
        return None
    fell = []
    if first.get("gold") is not None and last.get("gold") is not None and first["gold"] - last["gold"] > gold_margin:
        fell.append(f"gold accuracy {first['gold']:.3f} -> {last['gold']:.3f}")
    for name, start in first.get("independent", {}).items():
        sd0 = history[0].get("independent_std", {}).get(name) or 0.0
        end = last.get("independent", {}).get(name)
        if end is not None and start - end > rm_margin_sd * sd0:
            fell.append(f"independent RM '{name}' {start:.3f} -> {end:.3f}")
    if not fell:
        return None
    return (f"over-optimisation: from step {first['step']} to {last['step']} the proxy reward rose "
            f"{first['proxy']:.3f} -> {last['proxy']:.3f} while {'; '.join(fell)}")


def best_score(entry: dict[str, Any]) -> float | None:
    """What ``best/`` keeps the maximum of: gold accuracy where the prompts have gold answers, else the
    first independent reward model's mean; None when neither was measured."""
    if entry.get("gold") is not None:
        return entry["gold"]
    independent = entry.get("independent") or {}
    return next(iter(independent.values()), None)


def plot_overoptimisation(history: list[dict[str, Any]], png: Path) -> None:
    """Proxy, independent reward models and gold accuracy against the KL to the start (one panel each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kl = [h.get("kl") or 0.0 for h in history]
    panels = [("proxy reward (trained against)", [h["proxy"] for h in history])]
    for name in history[0].get("independent", {}):
        panels.append((f"independent RM '{name}'", [h["independent"].get(name) for h in history]))
    if any(h.get("gold") is not None for h in history):
        panels.append(("gold accuracy", [h.get("gold") for h in history]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (title, ys) in zip(axes[0], panels, strict=True):
        ax.plot(kl, ys, marker="o")
        for x, y, h in zip(kl, ys, history, strict=True):
            if y is not None:
                ax.annotate(str(h["step"]), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(title)
        ax.set_xlabel("KL to the start (nats, held-out answers)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
