"""One Prefect task per stage, wrapping the core functions of ``alignment``.

Tasks take a stage config and ``runs_dir`` and return the path of the stage's output folder (never
a model). Caching: the cache key is the stage key (config + the manifests of its inputs, see
``alignment.pipeline.plan_*``), so an unchanged stage is skipped across runs and processes and a
changed upstream invalidates everything below it. When the stage's folder vanished or is incomplete
the task is called with ``refresh_cache``, so the stage runs again (and its cache record is
rewritten) instead of returning a dead path. Results live in ``<runs_dir>/.prefect-results``.
The flow plans each stage once (``plan_stage``) and hands the plan to the task, whose cache key
and body reuse it; a task called alone plans for itself.

While a stage runs it updates a progress artifact; when it ends it publishes its metrics as a
markdown artifact with its plot embedded.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext

from alignment import tracking
from alignment.algorithms.dpo import DPOStageConfig, plan_dpo, run_dpo_stage
from alignment.algorithms.online import OnlineConfig
from alignment.algorithms.registry import ALGORITHMS, get_algorithm
from alignment.algorithms.sft import SFTConfig, plan_sft, run_sft_stage
from alignment.data import DataConfig, plan_data, run_data_stage
from alignment.evaluation.evaluate import ScoreConfig, plan_score, run_score_stage
from alignment.evaluation.judge import (
    JudgeBudgetExhausted,
    JudgeConfig,
    JudgeFatalError,
    plan_judge,
    run_judge_stage,
)
from alignment.pipeline import stage_planner
from alignment.rewards.ensemble import train_reward_model
from alignment.rewards.model import RewardModelConfig, plan_reward_model
from alignment.rounds.onpolicy import (
    LabelsConfig,
    SamplesConfig,
    plan_labels,
    plan_samples,
    run_labels_stage,
    run_samples_stage,
)
from alignment.stage import StagePlan, is_complete

log = logging.getLogger(__name__)


def result_storage(runs_dir: str | Path) -> Path:
    """Project-local result storage (a folder Prefect wraps in a LocalFileSystem): the cache records live here."""
    return (Path(runs_dir) / ".prefect-results").resolve()


def stage_cache_key(stage: str, planner: Callable[[Any, str], StagePlan]) -> Callable[[TaskRunContext, dict], str]:
    """A cache_key_fn: ``<stage>-<stage key>``, the key of the folder the stage writes."""

    def key_fn(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        try:
            plan = parameters.get("plan") or planner(parameters["config"], parameters["runs_dir"])
            return f"{stage}-{plan.key}"
        except Exception as exc:  # let the task itself run and fail with its clear message
            log.debug("%s: no cache key (%s)", stage, exc)
            return f"{stage}-unplanned-{uuid.uuid4().hex}"

    return key_fn


def plan_stage(task, config: Any, runs_dir: str) -> tuple[StagePlan | None, dict[str, Any]]:
    """Plan a stage once per run (its key and folder; for the data stage that means reading and
    hashing the source) and derive the task's per-run options from it: project-local results, and
    ``refresh_cache`` when the stage's folder is missing or incomplete, so a cache record never hands
    back a dead path (the stage runs again and its record is rewritten).

    The plan is passed to the task, whose cache key and body reuse it. A config that cannot be
    planned gives ``None``: the task then runs (uncached) and fails with the stage's own message.
    """
    try:
        plan = stage_planner(task.name)(config, runs_dir)
    except Exception as exc:
        log.debug("%s: cannot plan (%s)", task.name, exc)
        return None, {"result_storage": result_storage(runs_dir), "refresh_cache": True}
    return plan, {"result_storage": result_storage(runs_dir), "refresh_cache": not is_complete(plan)}


# --------------------------------------------------------------------------------------------
# Artifacts
# --------------------------------------------------------------------------------------------
def _artifact_key(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def embed_png(path: Path, alt: str) -> str:
    """Markdown image with the PNG inlined (the UI shows it without access to the runs folder)."""
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f"\n\n![{alt}](data:image/png;base64,{data})\n"


class Progress:
    """A progress artifact in the UI, updated at most every 1% (a callable: (done, total))."""

    def __init__(self, stage: str, description: str):
        self.id = create_progress_artifact(progress=0.0, key=_artifact_key(f"{stage}-progress"),
                                           description=description)
        self.last = -1.0

    def __call__(self, done: int, total: int, *_: Any) -> None:
        pct = 100.0 * done / max(total, 1)
        if pct - self.last >= 1.0 or done >= total:
            update_progress_artifact(self.id, progress=pct)
            self.last = pct


def _publish(stage: str, markdown: str, description: str) -> None:
    create_markdown_artifact(markdown=markdown, key=_artifact_key(f"{stage}-results"), description=description)


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------
# Not log_prints: libraries print noise (datasets' fingerprinting); the stages log through the
# "alignment" logger, which Prefect forwards to the UI (PREFECT_LOGGING_EXTRA_LOGGERS=alignment).
COMMON: dict[str, Any] = {"persist_result": True}


def _data_stage(name: str, config: DataConfig, runs_dir: str, plan: StagePlan | None) -> str:
    plan = plan or plan_data(config, runs_dir)
    result = run_data_stage(config, plan.out, overwrite=not is_complete(plan))
    m = result.summary
    _publish(name, f"# Data: {m['source']}\n\n| rows read | rejected | prompts | pairs | ties dropped | train | "
             f"validation |\n|---|---|---|---|---|---|---|\n| {m['n_rows_read']} | {m['n_rows_rejected']} | "
             f"{m['n_prompts']} | {m['n_pairs']} | {m['n_ties_dropped']} | {m['n_train']} | {m['n_validation']} |\n\n"
             f"Folder: `{result.out_dir}`", "prompts" if m.get("prompts_only") else "preference pairs")
    return str(result.out_dir)


@task(name="data", cache_key_fn=stage_cache_key("data", plan_data), **COMMON)
def data_task(config: DataConfig, runs_dir: str, plan: StagePlan | None = None) -> str:
    return _data_stage("data", config, runs_dir, plan)


@task(name="prompts", cache_key_fn=stage_cache_key("prompts", plan_data), **COMMON)
def prompts_task(config: DataConfig, runs_dir: str, plan: StagePlan | None = None) -> str:
    """The pipeline's second data stage (its ``prompts`` section): what the RL stage trains on and scoring scores."""
    return _data_stage("prompts", config, runs_dir, plan)


@task(name="sft", cache_key_fn=stage_cache_key("sft", plan_sft), **COMMON)
def sft_task(config: SFTConfig, runs_dir: str, plan: StagePlan | None = None) -> str:
    plan = plan or plan_sft(config, runs_dir)
    progress = Progress("sft", "supervised fine-tuning: training steps")
    result = run_sft_stage(config, plan.out, overwrite=not is_complete(plan), progress=progress)
    m = result.summary
    rows = "\n".join(f"| {name} | " + " | ".join(f"{m[name][t]['mean']:.4f} [{m[name][t]['ci95'][0]:.4f}, "
                                                 f"{m[name][t]['ci95'][1]:.4f}]" for t in ("rouge1", "rouge2", "rougeL"))
                     + " |" for name in ("rouge_before", "rouge_after", "rouge_source_summaries") if m.get(name))
    after = m["rouge_after"]["rougeL"]["mean"]
    _publish("sft", f"# Supervised fine-tuning ({m['prompt_format']} prompts)\n\nFolder: `{result.out_dir}`\n\n"
             f"{m['posts']['train']} training posts, {m['posts']['held_out']} held out.\n\n| | ROUGE-1 | ROUGE-2 | "
             f"ROUGE-L |\n|---|---|---|---|\n{rows}\n", f"SFT: ROUGE-L {after:.4f} on held-out posts")
    return str(result.out_dir)


@task(name="reward-model", cache_key_fn=stage_cache_key("reward-model", plan_reward_model), **COMMON)
def reward_model_task(config: RewardModelConfig, runs_dir: str, plan: StagePlan | None = None,
                      num_processes: int = 1) -> str:
    plan = plan or plan_reward_model(config, runs_dir)
    progress = Progress(f"rm-{config.kind}", f"{config.kind} reward model: training steps")
    if num_processes > 1:
        launch_stage("rm", config, plan.out, num_processes)
        result = train_reward_model(config, plan.out)  # reuses the launched run's complete folder
    else:
        result = train_reward_model(config, plan.out, overwrite=not is_complete(plan), progress=progress)
    m = result.summary
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in m.items() if isinstance(v, float))
    _publish(f"rm-{config.kind}", f"# {config.kind} reward model\n\nFolder: `{result.out_dir}`\n\n| metric | value |\n"
             f"|---|---|\n{rows}\n" + embed_png(result.out_dir / "reward_eval.png", "validation scores"),
             f"{config.kind} reward model: validation accuracy {m['accuracy']:.3f}")
    return str(result.out_dir)


def launch_stage(command: str, config: OnlineConfig | RewardModelConfig, out: Path, num_processes: int,
                 progress: Callable[[int, int], None] | None = None) -> None:
    """Run ``align <command>`` (``rm`` or an online algorithm: ``reinforce``, ``ppo``, ``grpo``, ...) under
    ``accelerate launch`` with ``num_processes`` data-parallel processes, writing to ``out``.

    The config travels as a YAML file beside the output; for an online algorithm, progress is read from
    ``metrics.jsonl`` while the processes train.
    """
    import subprocess
    import sys
    import time

    import yaml

    from alignment.hardware import thread_env

    out.parent.mkdir(parents=True, exist_ok=True)
    cfg_file = out.parent / f".{out.name}.launch-config.yaml"
    cfg_file.write_text(yaml.safe_dump({config.section: config.model_dump(mode="json", exclude={"section"})}))
    # --multi_gpu even on CPU: accelerate sends --cpu to its single-process launcher; the processes
    # still run on the configured device (gloo on CPU, NCCL on GPUs).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           "-m", "cli", command, "--config", str(cfg_file), "--out", str(out)]
    log.info("launching: %s", " ".join(cmd))
    # the launched processes' stage run is a child of the run open here (the pipeline's), with its tags
    proc = subprocess.Popen(cmd, env={**os.environ, **tracking.subprocess_env(), **thread_env(num_processes)})
    metrics = out / "metrics.jsonl"
    steps = getattr(config, "steps", 0)
    while proc.poll() is None:
        time.sleep(5)
        if progress is not None and steps and metrics.is_file():
            progress(len(metrics.read_text().splitlines()), steps)
    if proc.returncode != 0:
        raise RuntimeError(f"`align {command}` under accelerate launch ({num_processes} processes) failed with exit "
                           f"code {proc.returncode}; its output is in this task's log")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _online_stage(name: str, config: OnlineConfig, runs_dir: str, plan: StagePlan | None,
                  num_processes: int) -> str:
    """The body of every online algorithm's task: train (or resume, or reuse) and publish; the policy folder."""
    spec = get_algorithm(name)
    plan = plan or spec.plan_fn(config, runs_dir)
    title = "REINFORCE" if name == "reinforce" else name.upper()
    progress = Progress(name, f"{title}: optimizer steps")
    if num_processes > 1:
        launch_stage(name, config, plan.out, num_processes, progress)
        s = json.loads((plan.out / "final" / "summary.json").read_text())
    else:
        s = spec.train_fn(config, plan.out, progress=progress).summary
    final = plan.out / "final"
    lines = [f"# {title}\n\nPolicy: `{final}`\n"]
    if s.get("eval_before") and s.get("eval_after"):
        b, a = s["eval_before"], s["eval_after"]
        lines.append("| held-out (greedy) | before | after |\n|---|---|---|")
        for k in ("mean_reward", "eos_rate", "mean_length", "distinct2", "repetition"):
            lines.append(f"| {k} | {b[k]:.4f} | {a[k]:.4f} |")
    if s.get("heldout"):
        lines.append("\n| held-out at step | proxy | " + " | ".join(s["heldout"][0]["independent"]) + " | gold | KL |\n"
                     + "|---" * (4 + len(s["heldout"][0]["independent"])) + "|")
        for h in s["heldout"]:
            gold = "—" if h["gold"] is None else f"{h['gold']:.3f}"
            kl = "—" if h["kl"] is None else f"{h['kl']:.3f}"
            proxy = "—" if h["proxy"] is None else f"{h['proxy']:.3f}"
            lines.append(f"| {h['step']} | {proxy} | " + "".join(f"{v:.3f} | " for v in h["independent"].values())
                         + f"{gold} | {kl} |")
    for alarm in s.get("alarms", []):
        lines.append(f"\n**Over-optimisation alarm** at {alarm}")
    _publish(name, "\n".join(lines) + embed_png(final / "curves.png", "training curves")
             + embed_png(final / "overoptimisation.png", "proxy, independent RMs and gold against KL"),
             f"{title}: held-out reward before and after, over-optimisation curves")
    return str(final)


_ONLINE_TASKS: dict[str, Any] = {}


def online_task(name: str):
    """The Prefect task of online algorithm ``name`` (any entry of the algorithm registry), made once: task
    name ``name``, cache key ``<name>-<stage key>`` (its ``plan_<name>``), the policy folder as result."""
    if name not in _ONLINE_TASKS:
        spec = get_algorithm(name)

        def run(config: OnlineConfig, runs_dir: str, plan: StagePlan | None = None, num_processes: int = 1) -> str:
            return _online_stage(name, config, runs_dir, plan, num_processes)

        run.__name__ = run.__qualname__ = f"{name.replace('-', '_')}_task"  # Prefect's task key: one per algorithm
        run.__doc__ = f"Train the policy with {name} ({spec.module}); the path of its final/ policy folder."
        run.__annotations__ = {**run.__annotations__, "config": spec.config_cls}
        _ONLINE_TASKS[name] = task(name=name, cache_key_fn=stage_cache_key(name, spec.plan_fn), **COMMON)(run)
    return _ONLINE_TASKS[name]


def online_tasks() -> dict[str, Any]:
    """One task per registered online algorithm (reinforce, ppo, grpo, ...)."""
    return {name: online_task(name) for name in ALGORITHMS}


reinforce_task = online_task("reinforce")


@task(name="dpo", cache_key_fn=stage_cache_key("dpo", plan_dpo), **COMMON)
def dpo_task(config: DPOStageConfig, runs_dir: str, plan: StagePlan | None = None) -> str:
    plan = plan or plan_dpo(config, runs_dir)
    progress = Progress("dpo", "DPO: optimizer steps")
    result = run_dpo_stage(config, plan.out, overwrite=not is_complete(plan), runs_root=runs_dir, progress=progress)
    m = result.summary
    rows = "\n".join(f"| {k} | {m[k]} |" for k in ("pairs", "epochs", "seconds", "first_loss", "final_loss",
                                                    "final_reward_accuracy", "final_reward_margin") if k in m)
    _publish("dpo", f"# DPO\n\nPolicy: `{result.out_dir}`\n\n| metric | value |\n|---|---|\n{rows}\n",
             f"DPO: loss {m.get('first_loss')} -> {m.get('final_loss')}")
    return str(result.out_dir)


@task(name="score", cache_key_fn=stage_cache_key("score", plan_score), **COMMON)
def score_task(config: ScoreConfig, runs_dir: str, plan: StagePlan | None = None) -> str:
    plan = plan or plan_score(config, runs_dir)
    result = run_score_stage(config, plan.out, overwrite=not is_complete(plan))
    _publish("score", "# Mean reward on validation prompts\n\n" + (result.out_dir / "scores.md").read_text()
             + embed_png(result.out_dir / "rewards.png", "reward distributions"), "validation mean reward")
    return str(result.out_dir)


def _retry_judge(task, task_run, state) -> bool:
    """Retry the judge on transient failures only: not on a bad key/model or a spent budget."""
    try:
        state.result()
    except (JudgeFatalError, JudgeBudgetExhausted):
        return False
    except Exception:
        return True
    return False


def _secret_api_key(config: JudgeConfig) -> str | None:
    """The Gemini key from the Prefect Secret block ``config.api_key_secret`` when the environment has none
    (the environment wins); None otherwise. The value stays in memory: never a parameter, a log or a file."""
    from alignment.evaluation.judge import API_KEY_VARS, JudgeError

    if config.backend != "gemini" or not config.api_key_secret or any(os.environ.get(v) for v in API_KEY_VARS):
        return None
    from prefect.blocks.system import Secret

    try:
        return Secret.load(config.api_key_secret).get()
    except ValueError as exc:  # no such block
        raise JudgeError(f"api_key_secret={config.api_key_secret!r}: no Prefect Secret block of that name "
                         f"({exc.__class__.__name__}); create it in the UI (Blocks -> Secret) or set "
                         "GEMINI_API_KEY") from None


@task(name="judge", cache_key_fn=stage_cache_key("judge", plan_judge), retries=1, retry_delay_seconds=30,
      retry_condition_fn=_retry_judge, **COMMON)
def judge_task(config: JudgeConfig, runs_dir: str, plan: StagePlan | None = None) -> str:
    plan = plan or plan_judge(config, runs_dir)
    progress = Progress("judge", f"{config.backend} judge: judgments")
    result = run_judge_stage(config, plan.out, progress=progress, api_key=_secret_api_key(config))
    s = result.summary
    _publish("judge", (plan.out / "report.md").read_text().split("## Pairwise judge", 1)[-1].replace(
        "![judge](judge.png)", embed_png(plan.out / "judge.png", "judge")),
        f"{s['model_a']} vs {s['model_b']}: win rate {s['win_rate']:.3f}")
    return str(result.out_dir)


@task(name="samples", cache_key_fn=stage_cache_key("samples", plan_samples), **COMMON)
def samples_task(config: SamplesConfig, runs_dir: str, plan: StagePlan | None = None) -> str:
    """A round's on-policy answers (k per train prompt) and the pair of each prompt."""
    plan = plan or plan_samples(config, runs_dir)
    result = run_samples_stage(config, plan.out, overwrite=not is_complete(plan), runs_root=runs_dir)
    s = result.summary
    _publish(f"samples-r{config.round}", f"# Round {config.round}: on-policy samples\n\n{s['n_prompts']} prompts x "
             f"{s['samples_per_prompt']} answers -> {s['n_pairs']} pairs ({s['pairing']})\n\nFolder: `{result.out_dir}`",
             f"round {config.round}: {s['n_pairs']} pairs to label")
    return str(result.out_dir)


@task(name="labels", cache_key_fn=stage_cache_key("labels", plan_labels), retries=1, retry_delay_seconds=30,
      retry_condition_fn=_retry_judge, **COMMON)
def labels_task(config: LabelsConfig, runs_dir: str, plan: StagePlan | None = None) -> str:
    """A round's pairs labelled by the labeller chain; the reward models' accuracy on them."""
    plan = plan or plan_labels(config, runs_dir)
    api_key = _secret_api_key(config.judge.model_copy(update={"backend": "gemini"})) if config.gemini else None
    result = run_labels_stage(config, plan.out, overwrite=not is_complete(plan), runs_root=runs_dir, api_key=api_key)
    s = result.summary
    rows = "\n".join(f"| {name} | {v['pairs']} | {v['labelled']} | {v['ties_dropped']} |"
                     for name, v in s["labellers"].items())
    acc = "\n".join(f"| {name} | {a['accuracy']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}] | {a['n']} |"
                    for name, a in s["reward_model_accuracy"].items() if a.get("accuracy") is not None)
    _publish(f"labels-r{s['round']}", f"# Round {s['round']}: labelled pairs\n\n| labeller | pairs | labelled | ties "
             f"dropped |\n|---|---|---|---|\n{rows}\n\n" + (f"| reward model | accuracy on these pairs | n |\n|---|---|---|\n"
                                                         f"{acc}\n\n" if acc else "") + f"Folder: `{result.out_dir}`",
             f"round {s['round']}: {s['n_labelled']} labelled pairs")
    return str(result.out_dir)


# --------------------------------------------------------------------------------------------
# The algorithm comparison: one task per algorithm (its own process), then the report
# --------------------------------------------------------------------------------------------
def _algorithm_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """``<command>-<the run folder's name>`` (the stage key's prefix): the same config and inputs, the same key."""
    from alignment.compare import policy_folder

    try:
        out, _ = policy_folder(parameters["command"], parameters["config"], parameters["runs_dir"])
        return f"{parameters['command']}-{out.name}"
    except Exception as exc:  # let the task run and fail with the stage's own message
        log.debug("algorithm: no cache key (%s)", exc)
        return f"algorithm-unplanned-{uuid.uuid4().hex}"


@task(name="algorithm", cache_key_fn=_algorithm_key, **COMMON)
def algorithm_task(name: str, command: str, config: Any, runs_dir: str) -> dict[str, Any]:
    """Train one algorithm of a comparison in its own process; its folder, wall-clock and peak memory."""
    from alignment.compare import policy_folder, run_algorithm

    timing = run_algorithm(name, command, config, runs_dir)
    out, policy = policy_folder(command, config, runs_dir)
    _publish(f"algorithm-{name}", f"# {name}\n\nPolicy: `{policy}`\n\n{timing['seconds']} s, peak RSS "
             f"{timing['peak_rss_gb']} GB" + embed_png(policy / "overoptimisation.png", "held-out curves"),
             f"{name}: trained in {timing['seconds']} s")
    return {"folder": str(out), "policy": str(policy), **timing}


@task(name="comparison-report", **COMMON)
def comparison_task(config: Any, runs_dir: str) -> str:
    """Score every policy once (the scoring stage reuses its output when nothing changed) and write the table."""
    from alignment.compare import run_compare

    result = run_compare(config, runs_root=runs_dir)
    _publish("algorithm-comparison", "# Algorithms on equal budgets\n\n" + (result.out_dir / "compare.md").read_text()
             + embed_png(result.out_dir / "frontier.png", "reward against KL"), "algorithm comparison table")
    return str(result.out_dir)


def summary_markdown(stages: dict[str, dict[str, str]], report: str | None, verdict: str = "") -> str:
    """The pipeline's summary artifact: the verdict block first, then each stage's state, folder and cost
    (the seconds and peak resident memory of the run that made the output; a cached stage shows that run's)."""
    def cost(info: dict[str, Any], key: str, fmt: str) -> str:
        return "—" if info.get(key) is None else format(info[key], fmt)

    rows = "\n".join(f"| {name} | {info['state']} | {cost(info, 'seconds', '.0f')} | {cost(info, 'peak_rss_mb', ',.0f')} "
                     f"| `{info['path']}` |" for name, info in stages.items())
    peaks = [info["peak_rss_mb"] for info in stages.values() if info.get("peak_rss_mb") is not None]
    text = (f"# Alignment pipeline\n\n{verdict}\n## Stages\n\n| stage | state | seconds | peak RSS (MB) | output |\n"
            f"|---|---|---|---|---|\n{rows}\n")
    if peaks:
        text += f"\nPeak resident memory of the pipeline: {max(peaks):,.0f} MB (the largest stage's).\n"
    if report:
        text += f"\nReport: `{report}`\n"
    return text


__all__ = ["data_task", "dpo_task", "judge_task", "labels_task", "online_task", "online_tasks", "plan_stage",
           "prompts_task", "reinforce_task", "samples_task",
           "reward_model_task", "score_task", "sft_task", "summary_markdown"]
