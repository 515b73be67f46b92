"""The ``alignment-rounds`` flow: scheduled re-training that learns from its own outputs.

Each run (a tick of the ``alignment-rounds/retrain`` deployment, ``align round``, or ``align rounds --n N``)
walks the rounds in order: round 0 is the pipeline (``alignment-pipeline``'s stages, the same keys and
folders), then every round already complete comes back from the cache, and the next ``new_rounds`` rounds run:

    samples -> labels -> store (append, claim the inbox) -> data (+ store pairs) -> reward model(s) -> RL
    -> score -> judge

Every stage is a cached Prefect task (:mod:`tasks.stages`), so a failed round resumes at the stage that
failed. Once ``rounds.max_rounds`` rounds are complete a tick says so and completes from cache. The rounds
report (a markdown artifact with the plot, the tracker, ``<store>/<experiment>/report/``) is rewritten each run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from alignment import tracking as tracker
from alignment.pipeline import PipelineConfig, pipeline_verdict
from alignment.rounds.plan import STORE_STEP, experiment_id, round_stage_config, round_stages, store_root
from alignment.rounds.report import round_record, write_rounds_report
from alignment.rounds.store import PreferenceStore
from flows.pipeline import _run, flow_parent_run, pipeline_tasks, run_pipeline_stages
from tasks.stages import data_task, embed_png, labels_task, samples_task

DEMO_ROUNDS = PipelineConfig(**PipelineConfig.preset("demo-rounds"))


def _summary(folder: str) -> dict[str, Any]:
    return json.loads((Path(folder) / "summary.json").read_text(encoding="utf-8"))


def run_round(config: PipelineConfig, n: int, base: dict[str, str], previous: dict[str, str], store: PreferenceStore,
              stages: dict[str, dict[str, Any]], complete: bool = False) -> dict[str, str]:
    """Round ``n``'s stages in order (each cached); its record written last. Stage name -> folder. A
    ``complete`` round (walked again, from cache) claims no new inbox file: those wait for the next new round."""
    logger = get_run_logger()
    options, tasks = config.options, pipeline_tasks(config.options)
    current: dict[str, str] = {}
    for name in round_stages(config, base):
        label = f"r{n}.{name}"
        if name == STORE_STEP:
            changed = store.append_round(n, Path(current["labels"]) / "pairs.parquet")
            claimed = store.claimed(n) if complete else store.claim_inbox(n)
            logger.info("round %d: labelled pairs %s %s; %d inbox file(s) picked up%s", n,
                        "written to" if changed else "already in", store.round_file(n), len(claimed),
                        f" ({', '.join(p.name for p in claimed)})" if claimed else "")
            continue
        config_n = round_stage_config(config, n, name, base, previous, current,
                                      store_files=store.train_files(n) if name == "data" else None)
        task, task_options = {"samples": (samples_task, {}), "labels": (labels_task, {}),
                              "data": (data_task, {})}.get(name) or tasks[name]
        current[name] = _run(task, config_n, options, stages, label, **task_options)
    verdict = pipeline_verdict(current["score"], current.get("judge"))
    record = round_record(n, store.experiment, current, verdict, _summary(current["labels"]),
                          _summary(current["samples"]))
    store.write_record(n, record)  # last: the round is complete
    logger.info("round %d: %s", n, verdict["reading"])
    return current


@flow(name="alignment-rounds")
def alignment_rounds(pipeline: PipelineConfig = DEMO_ROUNDS, new_rounds: int = 1) -> dict[str, Any]:
    """Round 0 (the pipeline), the complete rounds from cache, then up to ``new_rounds`` new rounds (at most
    ``pipeline.rounds.max_rounds`` in all); the rounds report."""
    config = pipeline
    if new_rounds < 0:
        raise ValueError(f"new_rounds={new_rounds}: give 0 (report only) or more")
    with flow_parent_run(config, f"rounds {experiment_id(config)}", "rounds", "mlflow-rounds-run",
                         "These rounds in MLflow: one child run per stage, the curves per round.") as run:
        return _rounds(config, new_rounds, run)


def _rounds(config: PipelineConfig, new_rounds: int, run: tracker.Run | None) -> dict[str, Any]:
    logger = get_run_logger()
    store = PreferenceStore(store_root(config), experiment_id(config))
    store.open({"rounds": config.rounds.model_dump(mode="json")})
    stages: dict[str, dict[str, Any]] = {}
    base = run_pipeline_stages(config, stages, prefix="r0.")  # round 0: the pipeline's stages and folders
    # Records are rewritten from the stage folders on every walk (cheap), so they always read as this code does.
    store.write_record(0, round_record(0, store.experiment, base, pipeline_verdict(base["score"], base.get("judge")),
                                       None, None))
    previous, ran, limit = base, 0, config.rounds.max_rounds
    for n in range(1, limit + 1):
        complete = store.record(n) is not None
        if not complete and ran >= new_rounds:
            logger.info("round %d: not run now (%d new round(s) a run); the next run starts it", n, new_rounds)
            break
        logger.info("round %d: %s", n, "complete, from cache" if complete else "starting")
        previous = run_round(config, n, base, previous, store, stages, complete=complete)
        ran += not complete
    notes = []
    if ran == 0 and all(store.record(n) is not None for n in range(1, limit + 1)):
        notes.append(f"max_rounds={limit} reached: every round is complete and nothing new ran (every stage from "
                     "cache); raise rounds.max_rounds to continue.")
        logger.info(notes[-1])
    waiting = store.unclaimed_inbox()
    if waiting:
        notes.append(f"{len(waiting)} inbox file(s) wait for the next round: {', '.join(p.name for p in waiting[:5])}.")
        logger.info(notes[-1])
    records = store.records()
    report = write_rounds_report(records, store.report_dir, notes)
    create_markdown_artifact(markdown=report.read_text(encoding="utf-8").replace(
        "![rounds](rounds.png)", embed_png(store.report_dir / "rounds.png", "rounds")), key="alignment-rounds-report",
        description=f"{len(records) - 1} round(s) after round 0; {ran} new this run")
    if run is not None:
        for rec in records:
            run.log_metrics(_round_metrics(rec), step=rec["round"], prefix="rounds/")
        run.log_artifact(str(report))
        if (store.report_dir / "rounds.png").is_file():
            run.log_artifact(str(store.report_dir / "rounds.png"))
    return {"experiment": store.experiment, "store": str(store.dir), "new_rounds": ran,
            "rounds_complete": [r["round"] for r in records], "stages": stages, "report": str(report),
            "verdicts": {r["round"]: r["verdict"]["reading"] for r in records}, "notes": notes}


def _round_metrics(rec: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in ("proxy", "judge"):
        if rec.get(key):
            out[f"{key}"] = rec[key]["value"]
    for i, check in enumerate(rec.get("independent", {}).values()):
        out[f"independent_{i}"] = check["value"]
    gold = rec.get("gold") or {}
    if gold.get("paired_diff") is not None:
        out["gold_gain"], out["gold_accuracy"] = gold["paired_diff"], gold["accuracy"]
    for key in ("kl", "degenerate_share", "distinct2"):
        if rec.get(key) is not None:
            out[key] = rec[key]
    for name, a in ((rec.get("labels") or {}).get("reward_model_accuracy") or {}).items():
        if a.get("accuracy") is not None:
            out[f"rm_on_policy_accuracy/{'round0' if name == 'round0' else 'previous'}"] = a["accuracy"]
    return out


def run_rounds(config: PipelineConfig, new_rounds: int = 1) -> dict[str, Any]:
    """Run the rounds flow with a full config (``align round`` / ``align rounds --n N``)."""
    return alignment_rounds(pipeline=config, new_rounds=new_rounds)
