"""Plot the held-out curves (gold, proxy, independent RMs, length) of one or more online runs side by side.

    python scripts/plot_heldout.py LABEL=RUN_DIR [LABEL=RUN_DIR ...] --out curves.png
    python scripts/plot_heldout.py rounds=R0_DIR+R1_DIR+R2_DIR long=LONG_DIR --out rounds-vs-long.png

RUN_DIR is an online stage folder (``runs/grpo/<hash>`` or its ``final/``); its ``heldout.jsonl`` holds one
line per held-out evaluation (greedy, the same validation prompts each time). ``DIR1+DIR2+...`` chains runs
that continue one another (the RL stages of successive rounds, each starting from the last one's policy):
their steps add up, and each later run's step-0 evaluation (the policy the previous run ended with) is
dropped. The proxy of a chain changes with each run's reward model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_chain(spec: str) -> list[dict]:
    """The held-out history of ``DIR`` or of chained ``DIR1+DIR2+...`` runs, on one step axis."""
    history: list[dict] = []
    for i, folder in enumerate(spec.split("+")):
        part = read_heldout(Path(folder))
        offset = history[-1]["step"] if history else 0
        history += [{**h, "step": h["step"] + offset} for h in part if i == 0 or h["step"] > 0]
    return history


def read_heldout(folder: Path) -> list[dict]:
    for path in (folder / "heldout.jsonl", folder / "final" / "heldout.jsonl"):
        if path.is_file():
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    raise SystemExit(f"no heldout.jsonl in {folder} or {folder / 'final'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(item.partition("=")[0], read_chain(item.partition("=")[2])) for item in args.runs]
    panels = [("gold", "gold accuracy (held-out)"), ("proxy", "proxy RM (held-out)"),
              ("independent", "independent RM (held-out)"), ("mean_length", "length (tokens)")]
    if any(h.get("gold_lenient") is not None for _, history in runs for h in history):  # reasoning-gym items
        panels.insert(1, ("gold_lenient", "gold accuracy, lenient (held-out)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for label, history in runs:
        steps = [h["step"] for h in history]
        for ax, (key, title) in zip(axes, panels, strict=True):
            if key == "independent":
                for name in (history[0].get("independent") or {}):
                    ax.plot(steps, [h["independent"][name] for h in history], marker="o", label=f"{label}: {name}")
            else:
                values = [h.get(key) for h in history]
                if any(v is not None for v in values):
                    ax.plot(steps, [float("nan") if v is None else v for v in values], marker="o", label=label)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
