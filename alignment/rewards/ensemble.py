"""Reward-model ensembles: N members trained from different seeds and bootstrap resamples of the train pairs.

Coste et al. 2024 ("Reward Model Ensembles Help Mitigate Overoptimization") train the members of an
ensemble from different seeds; here member i of ``align rm ensemble=N`` is an ordinary reward-model
stage run with ``seed = config.seed + i``, the ensemble's ``max_train_pairs`` subset (``data_seed =
config.seed``: one subset for all members) and, with ``bootstrap`` (the default), its own seeded
resample with replacement of that subset (``resample = config.seed + i``).

Layout of the ensemble folder (``runs/rm/<kind>-ensemble<N>-<key[:12]>`` or ``--out``)::

    member-0/ ... member-<N-1>/   complete reward-model folders (``--rm ENSEMBLE/member-0`` works alone)
    metrics.json                  the members' accuracies and their spread on the validation pairs
    manifest.json                 stage "reward_model_ensemble": members (relative folders, stage keys,
                                  accuracies), the aggregation default; written last

Members are trained (resumably: checkpoints, reuse of a finished member) in a staging folder beside the
output, ``.<name>.members/``; the ensemble folder is then written in one step with
:func:`alignment.io.atomic_directory` (the members hard-linked, or copied, into it) and the staging
folder removed, so an ensemble folder is either complete or absent.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignment.data import PairData
from alignment.footprint import records_footprint
from alignment.io import MANIFEST, atomic_directory, read_manifest, sha256_file, write_json
from alignment.ownership import local_paths, remove_owned, write_scratch_marker
from alignment.stage import StageResult, complete_manifest, exclusive_stage, reuse_or_guard

log = logging.getLogger(__name__)

DEFAULT_AGGREGATE = "mean"  # what an `ensemble` component built from the folder aggregates by unless told


def member_configs(config) -> list:
    """The N members' configs (ensemble=1): seed + i, the ensemble's subset, bootstrap resample seed + i."""
    return [config.model_copy(update={"ensemble": 1, "seed": config.seed + i, "data_seed": config.seed,
                                      "resample": config.seed + i if config.bootstrap else None})
            for i in range(config.ensemble)]


def members_staging(out: str | Path) -> Path:
    """Where an ensemble writing ``out`` trains its members: ``.<name>.members`` beside it."""
    out = Path(out)
    return out.parent / f".{out.name}.members"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def ensemble_spread(margins: np.ndarray, rewards_chosen: np.ndarray, rewards_rejected: np.ndarray,
                    accuracies: list[float]) -> dict[str, Any]:
    """The members' spread. margins, rewards_*: (M, P) per member and validation pair; accuracies: M.

    ``margin_std_mean``: mean over pairs of the (population) std across members of r_w - r_l;
    ``disagreement``: share of pairs where the members do not all rank the same answer higher;
    ``ensemble_accuracy``: accuracy of the aggregated rewards (mean, min, mean - 1 std), by aggregate.
    Stds are population stds (over the M members), as :func:`aggregate_ensemble` takes them.
    """
    from alignment.rewards.components import aggregate_ensemble

    acc = np.asarray(accuracies, dtype=float)
    wins = margins > 0
    rw, rl = torch.from_numpy(rewards_chosen), torch.from_numpy(rewards_rejected)
    return {
        "member_accuracy": [float(a) for a in acc], "member_accuracy_mean": float(acc.mean()),
        "member_accuracy_std": float(acc.std()), "member_accuracy_min": float(acc.min()),
        "member_accuracy_max": float(acc.max()),
        "margin_std_mean": float(margins.std(0).mean()),
        "disagreement": float((wins.any(0) & ~wins.all(0)).mean()),
        "ensemble_accuracy": {how: float(((aggregate_ensemble(rw, how) - aggregate_ensemble(rl, how)) > 0)
                                         .float().mean()) for how in ("mean", "min", "mean_minus_std")},
    }


def _member_scores(folder: Path, config, val: PairData) -> tuple[np.ndarray, np.ndarray]:
    """(r_w, r_l) of one member on the validation pairs, scored as its own evaluation scored them (fp32
    weights, bf16 autocast per the config; E[r] for a distributional member)."""
    from alignment.hardware import bf16_enabled
    from alignment.rewards.model import RewardScorer

    scorer = RewardScorer.from_pretrained(folder, device=config.device, batch_size=config.eval_batch_size,
                                          max_length=config.max_length)
    scorer.bf16 = bf16_enabled(config.bf16, scorer.device)
    rw = scorer.score(val.prompts, val.chosen).mean.numpy().astype(np.float64)
    rl = scorer.score(val.prompts, val.rejected).mean.numpy().astype(np.float64)
    del scorer
    return rw, rl


@exclusive_stage
@records_footprint
def run_reward_ensemble(config, out_dir: str | Path | None = None, *, overwrite: bool = False,
                        runs_root: str | Path = "runs", progress: Callable[[int, int], None] | None = None
                        ) -> StageResult:
    """Train ``config.ensemble`` reward models (see the module docstring) into one ensemble folder.

    Each member is resumable and reused like any reward-model stage output; a complete ensemble folder
    with the same key is reused whole. ``overwrite`` replaces the ensemble folder (members retrained,
    except those an interrupted run of the same config already finished). Returns the ensemble's metrics (the members' accuracies and spread).
    """
    from alignment.rewards.model import (
        ENSEMBLE_STAGE,
        RewardModelError,
        _resolve_data,
        plan_reward_model,
        reward_stage_key,
        run_reward_stage,
    )

    if config.ensemble < 2:
        raise RewardModelError(f"run_reward_ensemble needs ensemble >= 2 (got {config.ensemble})")
    data_dir = _resolve_data(config, runs_root)
    config = config.model_copy(update={"data": str(data_dir)})
    plan = plan_reward_model(config, runs_root)
    key, out = plan.key, Path(out_dir) if out_dir is not None else plan.out
    if reuse_or_guard(out, key, RewardModelError, stage=ENSEMBLE_STAGE, overwrite=overwrite,
                      inputs=[data_dir, *local_paths(config.model_dump(mode="json"))], runs_root=runs_root) is not None:
        log.info("reward-model ensemble already trained in %s (same config and data): reusing it", out)
        return StageResult(out, json.loads((out / "metrics.json").read_text()), reused=True)

    # 1. Members, each an ordinary (resumable, reusable) reward-model stage run in the staging folder.
    staging = members_staging(out)
    staging.mkdir(parents=True, exist_ok=True)
    if not (staging / ".alignment-output.json").exists():
        if any(staging.iterdir()):
            raise RewardModelError(f"{staging} (the ensemble's staging folder) holds files this project did not "
                                   "write; move them away")
        write_scratch_marker(staging)  # ours: removed once the ensemble is written
    members, results = [], []
    for i, member in enumerate(member_configs(config)):
        log.info("ensemble member %d/%d (seed %d%s)", i + 1, config.ensemble, member.seed,
                 f", bootstrap resample {member.resample}" if member.resample is not None else "")
        folder = staging / f"member-{i}"
        # A member an interrupted run finished (same key) is reused, even under overwrite (which replaces the
        # ensemble folder: the Prefect task passes it whenever that folder is incomplete); anything else there
        # (a partial or stale member of ours) is replaced, resuming from the member's checkpoints.
        done = complete_manifest(folder, reward_stage_key(member, data_dir)) is not None
        result = run_reward_stage(member, folder, overwrite=not done, runs_root=runs_root, progress=progress)
        if not result.summary:  # a non-first process of a multi-process launch: the first one writes
            return StageResult(out, {}, reused=False)
        members.append(member)
        results.append(result)

    # 2. Spread on the validation pairs (before the folder is written: nothing trained is lost if cut short).
    val = PairData.load(data_dir / "validation.parquet")
    if config.max_eval_pairs is not None:
        val = val.head(config.max_eval_pairs)
    scores = [_member_scores(r.out_dir, config, val) for r in results]
    rw = np.stack([s[0] for s in scores])
    rl = np.stack([s[1] for s in scores])
    accuracies = [r.summary["accuracy"] for r in results]
    spread = ensemble_spread(rw - rl, rw, rl, accuracies)
    member_keys = [read_manifest(r.out_dir)["stage_key"] for r in results]
    train = [r.summary.get("train", {}) for r in results]
    metrics: dict[str, Any] = {
        "kind": config.kind, "ensemble": config.ensemble, "bootstrap": config.bootstrap, "n_pairs": len(val),
        # The mean-aggregated ensemble's accuracy and margin: what one reward model reports as its own.
        "accuracy": spread["ensemble_accuracy"]["mean"], "mean_margin": float((rw - rl).mean(0).mean()),
        "members": [{"folder": f"member-{i}", "seed": m.seed, "resample": m.resample, "accuracy": r.summary["accuracy"],
                     "mean_margin": r.summary["mean_margin"], "train_pairs": t.get("pairs"),
                     "final_loss": t.get("final_loss"), "seconds": t.get("seconds")}
                    for i, (m, r, t) in enumerate(zip(members, results, train, strict=True))],
        "spread": spread,
        "train": {"seconds": round(sum(t.get("seconds") or 0.0 for t in train), 1),
                  "pairs": train[0].get("pairs"), "epochs": config.epochs},
    }

    # 3. The ensemble folder, in one step: members linked in, metrics, manifest last.
    with atomic_directory(out) as tmp:
        files: dict[str, dict[str, str]] = {}
        for i, r in enumerate(results):
            name = f"member-{i}"
            shutil.copytree(r.out_dir, tmp / name, copy_function=_link_or_copy)
            listed = [*(read_manifest(tmp / name) or {}).get("files", {}), MANIFEST, "config.json"]
            files.update({f"{name}/{f}": {"sha256": sha256_file(tmp / name / f)} for f in listed})
        write_json(tmp / "metrics.json", metrics)
        files["metrics.json"] = {"sha256": sha256_file(tmp / "metrics.json")}
        write_json(tmp / MANIFEST, {
            "stage": ENSEMBLE_STAGE, "kind": config.kind, "stage_key": key, "config": config.model_dump(mode="json"),
            "data": str(data_dir), "data_manifest_sha256": sha256_file(data_dir / MANIFEST),
            "members": [{"folder": f"member-{i}", "stage_key": k, "seed": m.seed, "resample": m.resample,
                         "accuracy": r.summary["accuracy"]}
                        for i, (m, r, k) in enumerate(zip(members, results, member_keys, strict=True))],
            "aggregate": {"how": DEFAULT_AGGREGATE, "k": 1.0},
            "files": files,
        })
    remove_owned(staging, "the ensemble's staging folder")  # the members now live in the ensemble folder
    log.info("reward-model ensemble (%d x %s) saved to %s: member accuracies %s, margin std %.3f, disagreement %.3f",
             config.ensemble, config.kind, out, ", ".join(f"{a:.3f}" for a in accuracies),
             spread["margin_std_mean"], spread["disagreement"])
    return StageResult(out, metrics)



def train_reward_model(config, out_dir: str | Path | None = None, *, overwrite: bool = False,
                       runs_root: str | Path = "runs", progress: Callable[[int, int], None] | None = None) -> StageResult:
    """The reward-model stage: one reward model (:func:`alignment.rewards.model.run_reward_stage`), or with
    ``ensemble > 1`` an ensemble of members (:func:`run_reward_ensemble`). What `align rm` and the pipeline call."""
    from alignment.rewards.model import run_reward_stage

    train = run_reward_ensemble if config.ensemble > 1 else run_reward_stage
    return train(config, out_dir, overwrite=overwrite, runs_root=runs_root, progress=progress)
