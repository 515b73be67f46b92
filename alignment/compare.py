"""Algorithms side by side on equal budgets: ``align compare``.

From one data stage and one reward model (the proxy), run each algorithm from the same starting policy
with the same number of sampled completions (``samples``; DPO trains on the same data stage's pairs),
then one scoring of every policy on the same held-out prompts -- proxy, independent reward models,
gold -- and one table: the gains with their intervals, KL to the start, wall-clock, peak memory and
samples per second, and a plot of the reward-vs-KL frontier (each online run's held-out evaluations).

Each algorithm runs in its own process (``python -m cli <algorithm>``), so its wall-clock and peak
resident memory are its own; its folder is the stage's usual one, so a finished run is reused and a
failed one re-runs alone when the comparison is run again. One runs at a time, with the threads the cores
free at its start allow (:func:`alignment.hardware.thread_env`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from alignment import tracking
from alignment.algorithms.dpo import DPOStageConfig, plan_dpo
from alignment.algorithms.ppo import PPOConfig
from alignment.algorithms.registry import ALGORITHMS, get_algorithm
from alignment.algorithms.reinforce import ReinforceConfig
from alignment.config import Seed, StageConfig
from alignment.evaluation.evaluate import ScoreConfig, run_score_stage
from alignment.hardware import thread_env
from alignment.io import MANIFEST, atomic_directory, read_manifest, sha256_file, sha256_text, write_json
from alignment.models import DEFAULT_MODEL
from alignment.ownership import local_paths, replace_problem, write_record
from alignment.stage import StageResult, complete_manifest, exclusive_stage, stage_folder

log = logging.getLogger(__name__)

# Besides every registered online algorithm (alignment.algorithms.registry: reinforce, ppo, grpo, ...),
# these variants, each run by one of them (or DPO).
VARIANTS = {"rloo": "reinforce", "reinforce++": "ppo", "dpo": "dpo"}


def known_algorithms() -> list[str]:
    return [*ALGORITHMS, *(v for v in VARIANTS if v not in ALGORITHMS)]


TIMING = "timing.json"


class CompareError(RuntimeError):
    """A comparison cannot run, or one of its algorithms failed (the message says which)."""


class CompareConfig(StageConfig):
    """Which algorithms, on what, with which equal budget."""

    section: str = "compare"
    algorithms: list[str] = Field(default_factory=lambda: ["reinforce", "rloo", "ppo", "dpo"],
                                  description="Any registered online algorithm (reinforce, ppo, grpo, ...), "
                                  "rloo, reinforce++ or dpo.")
    policy: str = Field(DEFAULT_MODEL, description="The starting policy of every algorithm.")
    data: str | None = Field(None, description="Folder written by `align data`.")
    reward_model: str | None = Field(None, description="The proxy: the reward model the online algorithms train "
                                     "against (a folder written by `align rm`).")
    independent_reward_models: dict[str, str] = Field(default_factory=dict, description="name -> RM folder, never "
                                                      "trained against; scored during and after training.")
    samples: int = Field(64, ge=1, description="Sampled completions per online algorithm (the equal budget).")
    batch_size: int = Field(8, ge=2, description="Completions per step (RLOO: batch_size / 2 prompts x 2).")
    max_new_tokens: int = Field(64, ge=1)
    learning_rate: float = Field(2e-5, gt=0.0)
    kl_beta: float = Field(0.02, ge=0.0)
    ppo_epochs: int = Field(2, ge=1)
    dpo_learning_rate: float = Field(1e-6, gt=0.0)
    dpo_beta: float = Field(0.1, gt=0.0)
    eval_prompts: int = Field(16, ge=0, description="Held-out prompts of the training-time evaluations.")
    eval_every: int = Field(0, ge=0, description="Held-out evaluation every N steps (0: halfway and at the end).")
    n_prompts: int = Field(32, ge=1, description="Held-out prompts of the final scoring.")
    score_max_new_tokens: int = Field(64, ge=1)
    seed: Seed = 0
    bf16: bool | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> CompareConfig:
        if self.samples < self.batch_size:
            raise ValueError(f"samples={self.samples} is less than one batch (batch_size={self.batch_size})")
        if not self.algorithms:
            raise ValueError("at least one algorithm is needed")
        unknown = [a for a in self.algorithms if a not in known_algorithms()]
        if unknown:
            raise ValueError(f"unknown algorithm(s) {', '.join(unknown)}; known: {', '.join(known_algorithms())}")
        return self

    @property
    def steps(self) -> int:
        return self.samples // self.batch_size


def model_name(algorithm: str) -> str:
    """The algorithm's name as a scoring-stage model name (letters, digits, '-', '_', '.')."""
    return algorithm.replace("++", "-pp")


def algorithm_configs(cfg: CompareConfig) -> dict[str, tuple[str, StageConfig]]:
    """name -> (align command, its config), each with the same budget of ``steps * batch_size`` samples."""
    steps = cfg.steps
    common = dict(policy=cfg.policy, reward_model=cfg.reward_model, data=cfg.data, steps=steps,
                  independent_reward_models=cfg.independent_reward_models, max_new_tokens=cfg.max_new_tokens,
                  learning_rate=cfg.learning_rate, kl_beta=cfg.kl_beta, eval_prompts=cfg.eval_prompts,
                  eval_every=cfg.eval_every or max(1, steps // 2), checkpoint_every=max(1, steps // 2), seed=cfg.seed,
                  bf16=cfg.bf16, device=cfg.device)
    ppo = dict(ppo_epochs=cfg.ppo_epochs, minibatch_size=max(1, cfg.batch_size // 2))
    table: dict[str, tuple[str, StageConfig]] = {
        "reinforce": ("reinforce", ReinforceConfig(batch_size=cfg.batch_size, **common)),
        "rloo": ("reinforce", ReinforceConfig(batch_size=cfg.batch_size // 2, samples_per_prompt=2, baseline="rloo",
                                              **common)),
        "ppo": ("ppo", PPOConfig(batch_size=cfg.batch_size, **ppo, **common)),
        "reinforce++": ("ppo", PPOConfig(batch_size=cfg.batch_size, estimator="reinforce++", **ppo, **common)),
        "dpo": ("dpo", DPOStageConfig(policy=cfg.policy, data=cfg.data, learning_rate=cfg.dpo_learning_rate,
                                      beta=cfg.dpo_beta, seed=cfg.seed, bf16=cfg.bf16, device=cfg.device)),
    }
    out = {}
    for name in cfg.algorithms:
        if name in table:
            out[name] = table[name]
            continue
        # Any other registered algorithm: its own defaults, batch_size / k prompts x its k samples per prompt.
        spec = get_algorithm(name)
        k = spec.config_cls.model_fields["samples_per_prompt"].default
        out[name] = (name, spec.config_cls(batch_size=max(1, cfg.batch_size // k), **common))
    return out


def policy_folder(command: str, config: StageConfig, runs_dir: str | Path) -> tuple[Path, Path]:
    """(the run's folder, the policy folder inside it)."""
    if command == "dpo":
        out = plan_dpo(config, runs_dir).out
        return out, out
    out = get_algorithm(command).plan_fn(config, runs_dir).out
    return out, out / "final"


def algorithm_done(command: str, config: StageConfig, runs_dir: str | Path) -> bool:
    """The algorithm's policy folder is complete (manifest, intact files) and its timing recorded."""
    out, policy = policy_folder(command, config, runs_dir)
    manifest = read_manifest(policy) or {}
    return (out / TIMING).is_file() and complete_manifest(policy, manifest.get("stage_key", "")) is not None


def run_algorithm(name: str, command: str, config: StageConfig, runs_dir: str | Path) -> dict[str, Any]:
    """Train one algorithm in its own process (reused when its folder is complete); its wall-clock and peak
    resident memory, recorded beside its output."""
    out, policy = policy_folder(command, config, runs_dir)
    if algorithm_done(command, config, runs_dir):
        log.info("%s: reusing %s", name, policy)
        return {**json.loads((out / TIMING).read_text()), "reused": True}
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg_file = out.parent / f".{out.name}.compare-config.yaml"
    cfg_file.write_text(yaml.safe_dump({config.section: config.model_dump(mode="json", exclude={"section"})}))
    cmd = [sys.executable, "-m", "cli", "-q", command, "--config", str(cfg_file), "--out", str(out)]
    log.info("%s: %s", name, " ".join(cmd))
    start = time.perf_counter()
    # its run: a child of this one; its threads chosen now, from the cores free while this one waits
    proc = subprocess.Popen(cmd, env={**os.environ, **tracking.subprocess_env(), **thread_env(1)})
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise CompareError(f"{name} failed (exit code {code}); its output is above and its folder is {out}. "
                           "Run the comparison again: finished algorithms are reused, this one re-runs.")
    timing = {"seconds": round(seconds, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2)}
    write_record(out, TIMING, timing)
    return {**timing, "reused": False}


def compare_key(cfg: CompareConfig) -> str:
    inputs = [(read_manifest(f) or {}).get("stage_key", f) for f in (cfg.data, cfg.reward_model,
                                                                    *cfg.independent_reward_models.values()) if f]
    return sha256_text(json.dumps([cfg.model_dump(mode="json"), inputs, "compare-schema=1"], sort_keys=True))


@exclusive_stage  # one tracked run: each algorithm's stage and the scoring are its children
def run_compare(cfg: CompareConfig, out_dir: str | Path | None = None, *, runs_root: str | Path = "runs"
                ) -> StageResult:
    """Train every algorithm, score every policy once, write compare.json, compare.md and frontier.png."""
    if cfg.data is None or cfg.reward_model is None:
        raise CompareError("compare needs data (a folder written by `align data`) and reward_model (the proxy)")
    key = compare_key(cfg)
    out = Path(out_dir) if out_dir is not None else stage_folder(runs_root, "compare", key)
    problem = replace_problem(out, "compare", inputs=local_paths(cfg.model_dump(mode="json")), runs_root=runs_root)
    if problem is not None:  # checked before anything is trained: an earlier comparison of ours is replaced
        raise CompareError(problem)
    runs: dict[str, dict[str, Any]] = {}
    for name, (command, config) in algorithm_configs(cfg).items():
        run_dir, policy = policy_folder(command, config, runs_root)
        runs[name] = {"command": command, "folder": str(run_dir), "policy": str(policy),
                      **run_algorithm(name, command, config, runs_root)}
        summary_file = policy / ("metrics.json" if command == "dpo" else "summary.json")
        runs[name]["summary"] = json.loads(summary_file.read_text())
        runs[name]["samples"] = cfg.samples if command != "dpo" else runs[name]["summary"]["pairs"]
    score = run_score_stage(ScoreConfig(
        models={"base": cfg.policy, **{model_name(name): r["policy"] for name, r in runs.items()}},
        reward_models={"proxy": cfg.reward_model, **cfg.independent_reward_models}, proxy_reward_model="proxy",
        data=cfg.data, n_prompts=cfg.n_prompts, max_new_tokens=cfg.score_max_new_tokens, seed=cfg.seed,
        bf16=cfg.bf16, device=cfg.device), runs_root=runs_root)
    table = comparison_table(score.summary, runs)
    with atomic_directory(out) as tmp:
        write_json(tmp / "compare.json", {"config": cfg.model_dump(mode="json"), "score": str(score.out_dir),
                                          "rows": table, "runs": {k: {kk: vv for kk, vv in v.items() if kk != "summary"}
                                                                   for k, v in runs.items()}})
        (tmp / "compare.md").write_text(comparison_markdown(table, cfg, score.out_dir), encoding="utf-8")
        plot_frontier(runs, score.summary, tmp / "frontier.png")
        write_json(tmp / MANIFEST, {"stage": "compare", "stage_key": key, "files": {
            f.name: {"sha256": sha256_file(f)} for f in sorted(tmp.iterdir()) if not f.name.startswith(".")}})
    log.info("comparison written to %s", out)
    return StageResult(out, {"rows": table, "score": str(score.out_dir)})


def comparison_table(scores: dict[str, Any], runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per algorithm from the scoring summary and the runs' timings."""
    rows = []
    for name, run in runs.items():
        m = scores["models"][model_name(name)]
        row: dict[str, Any] = {"algorithm": name, "kl": m["kl_to_reference"], "seconds": run["seconds"],
                               "peak_rss_gb": run["peak_rss_gb"], "samples": run["samples"],
                               "samples_per_second": round(run["samples"] / run["seconds"], 3) if run["seconds"] else None}
        for rm, r in m["rewards"].items():
            row[f"{r['role']}:{rm}"] = {"diff": r["paired_diff"], "ci95": r["paired_diff_ci95"]}
        if m.get("gold"):
            row["gold"] = {"diff": m["gold"]["paired_diff"], "ci95": m["gold"]["paired_diff_ci95"],
                           "accuracy": m["gold"]["accuracy"]}
        rows.append(row)
    return rows


def _cell(value: dict[str, Any] | None) -> str:
    if not value:
        return "—"
    return f"{value['diff']:+.3f} [{value['ci95'][0]:.3f}, {value['ci95'][1]:.3f}]"


def comparison_markdown(rows: list[dict[str, Any]], cfg: CompareConfig, score_dir: Path) -> str:
    gains = [k for k in rows[0] if ":" in k]
    head = " | ".join(f"{k.split(':')[0]} RM '{k.split(':')[1]}' gain" for k in gains)
    lines = [f"Equal budgets: {cfg.samples} sampled completions per online algorithm ({cfg.steps} steps of "
             f"{cfg.batch_size}); DPO on the data stage's train pairs. Scored on {cfg.n_prompts} held-out prompts "
             f"(greedy, {cfg.score_max_new_tokens} new tokens) in `{score_dir}`; gains are paired differences "
             "to the starting model with 95% intervals.", "",
             f"| algorithm | {head} | gold gain | KL to start | wall-clock s | peak RSS GB | samples/s |",
             "|---" * (6 + len(gains)) + "|"]
    for r in rows:
        kl = "—" if r["kl"] is None else f"{r['kl']:.2f}"
        lines.append(f"| {r['algorithm']} | " + " | ".join(_cell(r[k]) for k in gains)
                     + f" | {_cell(r.get('gold'))} | {kl} | {r['seconds']} | {r['peak_rss_gb']} | {r['samples_per_second']} |")
    return "\n".join(lines) + "\n"


def plot_frontier(runs: dict[str, dict[str, Any]], scores: dict[str, Any], png: Path) -> None:
    """Proxy reward against KL to the start: each online run's held-out evaluations, and each scored policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in runs.items():
        history = run["summary"].get("heldout") or []
        if history:
            ax1.plot([h.get("kl") or 0.0 for h in history], [h["proxy"] for h in history], marker="o", label=name)
    ax1.set_title("held-out proxy reward during training")
    ax1.set_xlabel("KL to the start (nats)")
    ax1.legend()
    for name, m in scores["models"].items():
        r = m["rewards"]["proxy"]
        ax2.errorbar([m["kl_to_reference"] or 0.0], [r["mean"]], yerr=[[r["mean"] - r["ci95"][0]], [r["ci95"][1] - r["mean"]]],
                     marker="o", capsize=3, label=name)
    ax2.set_title("final policies: proxy reward (95% CI)")
    ax2.set_xlabel("KL to the start (nats)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
