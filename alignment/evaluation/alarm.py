"""Over-optimisation: the proxy rises while the truth does not (Gao et al. 2023).

The alarm an online run raises over its held-out evaluations (the proxy reward rose while gold accuracy
or an independent reward model fell), the score ``best/`` keeps the maximum of, and the plot of the
held-out curves against the KL to the start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class OverOptimisationDetected(RuntimeError):
    """The over-optimisation alarm stopped the run (alarm_action='stop'); ``best/`` is kept."""


def overoptimisation_alarm(history: list[dict[str, Any]], window: int, gold_margin: float,
                           rm_margin_sd: float, watch_gold: bool = True) -> str | None:
    """A warning when, over the last ``window`` held-out evaluations, the proxy reward rose while gold
    accuracy fell by more than ``gold_margin`` or an independent reward model fell by more than
    ``rm_margin_sd`` of its standard deviation over the prompts at the first evaluation; else None.

    history: one dict per evaluation, oldest first, with ``step``, ``proxy`` (mean reward of the model
    trained against), ``independent`` ({name: mean}), ``independent_std`` ({name: std}) and ``gold``
    (accuracy or None). ``watch_gold=False`` when gold is itself a training reward: it is then no witness
    against the proxy, and only the reward models not trained against are watched.
    """
    if len(history) < max(window, 2):
        return None
    first, last = history[-window], history[-1]
    if last["proxy"] <= first["proxy"]:
        return None
    fell = []
    if (watch_gold and first.get("gold") is not None and last.get("gold") is not None
            and first["gold"] - last["gold"] > gold_margin):
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
