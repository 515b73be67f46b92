"""The rounds report: per round the reward model's accuracy on the next round's freshly labelled on-policy
pairs (does the RM keep up with the policy?), and the proxy / independent RM / gold / judge / KL curves and
the share of degenerate answers across rounds, as a table, a plot and JSON (no Prefect here)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from alignment.evaluation.degenerate import is_degenerate
from alignment.ownership import NotOurs, file_problem, write_own_file


def degenerate_share(score_dir: str | Path, model: str) -> float | None:
    path = Path(score_dir) / "generations" / f"{model}.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sum(is_degenerate(r["completion"]) for r in rows) / len(rows) if rows else None


def round_record(n: int, experiment: str, stages: dict[str, str], verdict: dict[str, Any],
                 labels: dict[str, Any] | None, samples: dict[str, Any] | None) -> dict[str, Any]:
    """What the report needs of one round, read from its stage folders (``stages``: name -> folder)."""
    scores = json.loads((Path(stages["score"]) / "scores.json").read_text(encoding="utf-8"))
    tuned = verdict["model"]
    m = scores["models"][tuned]
    checks = {c["kind"] if c["kind"] != "independent" else c["name"]: c for c in verdict["checks"]}
    judged = json.loads((Path(stages["judge"]) / "summary.json").read_text(encoding="utf-8")) \
        if stages.get("judge") else {}
    used = set((labels or {}).get("labellers") or {})
    return {"round": n, "experiment": experiment, "stages": stages, "verdict": verdict,
            "proxy": checks.get("proxy"), "gold": m.get("gold"), "kl": m.get("kl_to_reference"),
            "independent": {c["name"]: c for c in verdict["checks"] if c["kind"] == "independent"},
            "judge": checks.get("judge"), "judge_lc_win_rate": judged.get("lc_win_rate"),
            "judge_lc_ci95": judged.get("lc_ci95"), "labelled_by": sorted(used),
            "distinct2": m.get("distinct2"), "eos_rate": m.get("eos_rate"),
            "degenerate_share": degenerate_share(stages["score"], tuned),
            "labels": labels, "samples": samples}


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def _ci(check: dict[str, Any] | None, signed: bool = True) -> str:
    if not check:
        return "—"
    v = format(check["value"], "+.3f" if signed else ".3f")
    return f"{v} [{check['ci95'][0]:.3f}, {check['ci95'][1]:.3f}]"


def on_policy_accuracy(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round n >= 1: the accuracy, on round n's freshly labelled pairs (sampled from round n-1's policy), of
    round n-1's reward model and of round 0's (from round 2 on)."""
    rows = []
    for rec in records:
        acc = (rec.get("labels") or {}).get("reward_model_accuracy") or {}
        if acc:
            rows.append({"round": rec["round"], **{name: a for name, a in acc.items()}})
    return rows


def rounds_markdown(records: list[dict[str, Any]], notes: list[str] | None = None) -> str:
    lines = ["# Rounds: on-policy re-training\n",
             "Each round n >= 1 sampled the previous policy, labelled the pairs, retrained the reward model on "
             "old + new pairs and ran RL again from the previous policy. Every figure is against round 0's "
             "starting policy on the same held-out prompts (paired differences with 95% intervals).\n",
             "| round | proxy RM | independent RM | gold | judge win rate | length-controlled | KL | degenerate | "
             "labelled pairs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        ind = next(iter(rec.get("independent", {}).values()), None)
        gold = rec.get("gold") or {}
        gold_s = (f"{gold['accuracy']:.3f} ({gold['paired_diff']:+.3f} [{gold['paired_diff_ci95'][0]:.3f}, "
                  f"{gold['paired_diff_ci95'][1]:.3f}])") if gold.get("paired_diff") is not None else "—"
        lab = rec.get("labels") or {}
        pairs = f"{lab['n_labelled']} of {lab['n_pairs']}" if lab else "—"
        lc = rec.get("judge_lc_win_rate")
        lc_s = f"{lc:.3f} [{rec['judge_lc_ci95'][0]:.3f}, {rec['judge_lc_ci95'][1]:.3f}]" if lc is not None else "—"
        lines.append(f"| {rec['round']} | {_ci(rec.get('proxy'))} | {_ci(ind)} | {gold_s} | "
                     f"{_ci(rec.get('judge'), signed=False)} | {lc_s} | {_fmt(rec.get('kl'))} | "
                     f"{_fmt(rec.get('degenerate_share'), '.2f')} | {pairs} |")
    acc = on_policy_accuracy(records)
    if acc:
        lines += ["\n## Does the reward model keep up with the policy?\n",
                  "Accuracy on each round's freshly labelled pairs (answers of the previous round's policy, which "
                  "no reward model has trained on), with Wilson 95% intervals:\n",
                  "| round (pairs from policy of round) | reward model | accuracy | chosen longer | chosen shorter |",
                  "|---|---|---|---|---|"]
        for row in acc:
            for name, a in row.items():
                if name == "round" or a.get("accuracy") is None:
                    continue
                split = a.get("length_split") or {}
                part = {key: f"{s['accuracy']:.2f} (n={s['n']})" if (s := split.get(key) or {}).get("accuracy")
                        is not None else "—" for key in ("chosen_longer", "chosen_shorter")}
                lines.append(f"| {row['round']} ({row['round'] - 1}) | {name} | {a['accuracy']:.3f} "
                             f"[{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}] (n={a['n']}) | {part['chosen_longer']} | "
                             f"{part['chosen_shorter']} |")
    length = [(rec["round"], (rec.get("labels") or {}).get("length") or {}) for rec in records]
    length = [(n, s) for n, s in length if s.get("n")]
    if length:
        lines.append("\nLabellers' preference for the longer answer: " + "; ".join(
            f"round {n}: {s['share_longer_preferred']:.2f} of {s['n']}" for n, s in length) + ".")
    contaminated = [rec["round"] for rec in records if "reward_models" in rec.get("labelled_by", [])]
    if contaminated:
        lines.append(f"\n**Not independent from round {contaminated[0]} on:** the 'reward_models' labeller (rounds "
                     f"{', '.join(map(str, contaminated))}) labelled pairs with the reward models not trained against, "
                     "so the retrained reward model learnt them and their 'independent' column is no longer an "
                     "independent check; gold and the judge still are.")
    for note in notes or []:
        lines.append(f"\n{note}")
    return "\n".join(lines) + "\n"


def plot_rounds(records: list[dict[str, Any]], png: Path | io.BytesIO) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["round"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))

    def series(get):
        return [get(r) for r in records]

    for name, get in (("proxy RM", lambda r: (r.get("proxy") or {}).get("value")),
                      ("independent RM", lambda r: next(iter(r.get("independent", {}).values()), {}).get("value")),
                      ("gold", lambda r: (r.get("gold") or {}).get("paired_diff"))):
        ys = series(get)
        if any(y is not None for y in ys):
            axes[0].plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=name)
    axes[0].axhline(0, color="grey", lw=0.5)
    axes[0].set(title="paired gain over round 0's start", xlabel="round")
    axes[0].legend(fontsize=8)
    axes[1].plot(xs, [float("nan") if r.get("kl") is None else r["kl"] for r in records], marker="o", label="KL")
    axes[1].plot(xs, [float("nan") if r.get("degenerate_share") is None else r["degenerate_share"] for r in records],
                 marker="s", label="degenerate share")
    axes[1].set(title="KL to the start, degenerate answers", xlabel="round")
    axes[1].legend(fontsize=8)
    for row in on_policy_accuracy(records):
        for name, a in ((k, v) for k, v in row.items() if k != "round"):
            if a.get("accuracy") is None:
                continue
            lo, hi = a["ci95"]
            axes[2].errorbar(row["round"] + (0.08 if name == "round0" else 0), a["accuracy"],
                             yerr=[[a["accuracy"] - lo], [hi - a["accuracy"]]], fmt="o" if name == "round0" else "s",
                             color="C1" if name == "round0" else "C0",
                             label="round 0's RM" if name == "round0" else "previous round's RM")
    handles, labels = axes[2].get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=True))
    if uniq:
        axes[2].legend(uniq.values(), uniq.keys(), fontsize=8)
    axes[2].axhline(0.5, color="grey", lw=0.5)
    axes[2].set(title="RM accuracy on fresh on-policy pairs", xlabel="round", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(png, dpi=110, format="png")
    plt.close(fig)


REPORT_FILES = ("rounds.json", "rounds.png", "report.md")


def write_rounds_report(records: list[dict[str, Any]], folder: Path, notes: list[str] | None = None) -> Path:
    """``report.md``, ``rounds.png`` and ``rounds.json`` in ``folder`` (rewritten each tick). Each is a file outside
    a stage folder, recorded as ours when written (``alignment.ownership.write_own_file``): one that this project did
    not write (or that was edited since) is refused (``NotOurs``) before anything is written."""
    for name in REPORT_FILES:
        problem = file_problem(folder / name, "the rounds report file")
        if problem is not None:
            raise NotOurs(problem)
    folder.mkdir(parents=True, exist_ok=True)
    write_own_file(folder / "rounds.json", json.dumps(records, indent=2, ensure_ascii=False) + "\n")
    if records:
        png = io.BytesIO()
        plot_rounds(records, png)
        write_own_file(folder / "rounds.png", png.getvalue())
    text = rounds_markdown(records, notes) + ("\n![rounds](rounds.png)\n" if records else "")
    write_own_file(folder / "report.md", text)
    return folder / "report.md"
