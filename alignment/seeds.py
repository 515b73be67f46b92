"""One recipe on several seeds: each seed's result with its interval, and the spread across seeds.

``align seeds --preset demo-rlvr --seeds 0,1,2`` runs the pipeline once per seed, the seed set in the
sections listed in :data:`SEEDED` (the prompts drawn, the RL run's sampling and initialisation, the scored
subset); the data and reward-model stages keep their own seeds, so their folders are shared by every seed
and come from cache after the first. This module turns each seed's ``scores.json`` (the score stage of
that seed's pipeline) into one row (:func:`seed_row`) and the rows into the report
(:func:`seeds_summary`, :func:`seeds_markdown`): per seed the held-out gold difference with its 95% CI and
McNemar's exact p-value, the lenient gold check, every reward model never trained against, the
degenerate-answer share and the EOS rate; across seeds the mean, standard deviation and range of each
difference, and, per gold check, the seeds that show a gain at p < :data:`ALPHA`.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

SEEDED = ("prompts", "rl", "score")
"""The pipeline sections whose ``seed`` a seeds run sets ("rl": the RL stage, ``options.algorithm``'s)."""
ALPHA = 0.01


def seed_overrides(seed: int, algorithm: str) -> dict[str, dict[str, int]]:
    """The per-section ``seed`` overrides of one seed's pipeline."""
    return {algorithm if section == "rl" else section: {"seed": seed} for section in SEEDED}


def _gold(entry: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not entry:
        return None
    mc = entry.get("mcnemar") or {}
    return {"n": entry["n"], "accuracy": entry["accuracy"], "paired_diff": entry.get("paired_diff"),
            "ci95": entry.get("paired_diff_ci95"), "gained": mc.get("gained"), "lost": mc.get("lost"),
            "p_value": mc.get("p_value")}


def seed_row(seed: int, scores: Mapping[str, Any], model: str = "tuned") -> dict[str, Any]:
    """One seed's figures from its score stage's ``scores.json``: ``model`` against the reference (the start)."""
    ref_name = scores["reference"]
    if model not in scores["models"]:
        raise ValueError(f"seed {seed}: scores.json has no model {model!r} (has {', '.join(scores['models'])})")
    mine, ref = scores["models"][model], scores["models"][ref_name]
    row: dict[str, Any] = {
        "seed": seed, "n_prompts": scores["n_prompts"],
        "gold": _gold(mine.get("gold")), "gold_before": (ref.get("gold") or {}).get("accuracy"),
        "gold_lenient": _gold(mine.get("gold_lenient")),
        "gold_lenient_before": (ref.get("gold_lenient") or {}).get("accuracy"),
        "independent": {}, "eos": (ref["eos_rate"], mine["eos_rate"]),
        "mean_length": (ref["mean_length"], mine["mean_length"]),
        "degenerate": ((ref.get("degenerate") or {}).get("share"), (mine.get("degenerate") or {}).get("share")),
    }
    row["by_task"] = {}
    for key in ("gold", "gold_lenient"):
        for task, t in ((mine.get(key) or {}).get("by_task") or {}).items():
            before = ((ref.get(key) or {}).get("by_task") or {}).get(task, {})
            row["by_task"].setdefault(task, {})[key] = {"n": t["n"], "before": before.get("accuracy"),
                                                         "after": t["accuracy"], "ci95": t["ci95"]}
    for rm, r in mine.get("rewards", {}).items():
        if r.get("role") == "independent" and "paired_diff" in r:
            row["independent"][rm] = {"paired_diff": r["paired_diff"], "ci95": r["paired_diff_ci95"]}
    return row


def _spread(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def seeds_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The spread across seeds of each paired difference, and the seeds whose gold gain has p < ALPHA."""
    def diffs(key):
        return [r[key]["paired_diff"] for r in rows if r.get(key) and r[key].get("paired_diff") is not None]

    rms = sorted({rm for r in rows for rm in r["independent"]})
    significant = {key: [r["seed"] for r in rows if r.get(key) and (r[key]["paired_diff"] or 0) > 0
                         and r[key]["p_value"] is not None and r[key]["p_value"] < ALPHA]
                   for key in ("gold", "gold_lenient") if any(r.get(key) for r in rows)}
    return {"seeds": [r["seed"] for r in rows], "rows": list(rows), "alpha": ALPHA,
            "gold": _spread(diffs("gold")), "gold_lenient": _spread(diffs("gold_lenient")),
            "independent": {rm: _spread([r["independent"][rm]["paired_diff"] for r in rows if rm in r["independent"]])
                            for rm in rms},
            "significant_gain_seeds": significant}


def _diff(g: Mapping[str, Any] | None) -> str:
    if not g or g.get("paired_diff") is None:
        return "—"
    lo, hi = g["ci95"]
    return f"{g['paired_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _p(g: Mapping[str, Any] | None) -> str:
    return "—" if not g or g.get("p_value") is None else f"{g['gained']}/{g['lost']}, p={g['p_value']:.2g}"


def _pair(values: Sequence[float | None], fmt: str = "{:.3f}") -> str:
    return " -> ".join("—" if v is None else fmt.format(v) for v in values)


def seeds_markdown(summary: Mapping[str, Any]) -> str:
    """The seeds report: one row per seed, then the spread."""
    rows = summary["rows"]
    rms = sorted(summary["independent"])
    lines = ["# One recipe, several seeds", "",
             "Each row: the tuned policy against its start on that seed's held-out prompts (never trained on). "
             "Differences with 95% CIs; gained/lost and McNemar's exact p for the gold checks.", "",
             "| seed | prompts | gold (strict) | diff (95% CI) | gained/lost, p | lenient | diff (95% CI) | "
             "gained/lost, p | " + "".join(f"{rm} diff (95% CI) | " for rm in rms)
             + "degenerate share | EOS | mean length |",
             "|---:|---:|---|---|---|---|---|---|" + "---|" * len(rms) + "---|---|---|"]
    for r in rows:
        g, gl = r.get("gold"), r.get("gold_lenient")
        lines.append(
            f"| {r['seed']} | {r['n_prompts']} | {_pair([r['gold_before'], g and g['accuracy']])} | {_diff(g)} | "
            f"{_p(g)} | {_pair([r['gold_lenient_before'], gl and gl['accuracy']])} | {_diff(gl)} | {_p(gl)} | "
            + "".join(f"{_diff(r['independent'].get(rm))} | " for rm in rms)
            + f"{_pair(r['degenerate'])} | {_pair(r['eos'], '{:.2f}')} | {_pair(r['mean_length'], '{:.1f}')} |")
    if any(r.get("by_task") for r in rows):
        lines += ["", "Per task (accuracy before -> after; after's 95% Wilson CI):", "",
                  "| seed | task | prompts | gold (strict) | gold (lenient) |", "|---:|---|---:|---|---|"]
        for r in rows:
            for task, t in sorted(r.get("by_task", {}).items()):
                cells = []
                for key in ("gold", "gold_lenient"):
                    c = t.get(key)
                    cells.append("—" if c is None else f"{_pair([c['before'], c['after']])} "
                                 f"[{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]")
                n = (t.get("gold") or t.get("gold_lenient"))["n"]
                lines.append(f"| {r['seed']} | {task} | {n} | {cells[0]} | {cells[1]} |")
    lines += ["", "Across seeds (mean, sd, range of the paired differences):", ""]
    for label, s in [("gold (strict)", summary["gold"]), ("gold (lenient)", summary["gold_lenient"]),
                     *[(f"{rm} (independent RM)", summary["independent"][rm]) for rm in rms]]:
        if s:
            lines.append(f"- {label}: {s['mean']:+.3f} ± {s['sd']:.3f} (range {s['min']:+.3f} to {s['max']:+.3f}, "
                         f"{s['n']} seeds)")
    for key, sig in summary["significant_gain_seeds"].items():
        label = "gold (strict)" if key == "gold" else "gold (lenient)"
        lines.append(f"- seeds with a {label} gain at McNemar p < {summary['alpha']}: {len(sig)} of {len(rows)}"
                     + (f" ({', '.join(map(str, sig))})" if sig else ""))
    return "\n".join(lines) + "\n"
