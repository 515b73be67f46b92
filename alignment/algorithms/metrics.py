"""The online loop's metrics log (``metrics.jsonl``, one JSON line per step), cut back to the checkpoint a
resumed run restarts from, and the training curves drawn from it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


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
