"""Checks of a stage's input folders, made before the stage loads any model.

A later stage reads what earlier ones wrote: a data set (``align data``), reward models (``align rm``),
policies (a hub id, a ``.gguf`` file, or a folder: the base model, ``align sft``/``dpo``, a training
run's ``final/``), scores (``align score``). :func:`require_stage_output` checks that a folder is a
complete output of the stage it should come from: it exists, its ``manifest.json`` (written last)
names that stage, lists the files the stage always writes, and every file it lists still has its
recorded SHA-256 (a truncated, changed or hand-edited file is caught, and so is a manifest whose
``stage`` or a file hash was edited by hand). :func:`require_model_source` checks a policy spec that
names a local path is a loadable model: a ``.gguf`` file, or a folder with ``config.json`` and
weights, not a reward model, and intact where it carries a manifest. Each raises the calling stage's
own error class with one line naming the folder and what is wrong, so the CLI prints it and exits 2.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from alignment.algorithms.registry import ALGORITHMS
from alignment.hub import looks_like_repo_id
from alignment.io import MANIFEST, sha256_file

# What each stage's folder is called in an error message ("... is not <this>").
LABELS = {
    "data": "a completed data stage output (written by `align data`)",
    "reward_model": "a saved reward model (written by `align rm`)",
    "score": "a finished `align score` output",
}
# Files a stage always writes (and lists in its manifest); a folder without them is not its output.
REQUIRED_FILES = {"data": ("train.parquet", "validation.parquet")}
# Said after "its manifest.json says stage X, not Y" for (wanted, found) pairs with an obvious fix.
WRONG_STAGE_HINTS = {
    ("reward_model", "reward_model_ensemble"): (
        ": it is a reward-model ensemble (`align rm ensemble=N`); use it as a reward component {kind: ensemble, "
        "folder: FOLDER}, or one of its members (FOLDER/member-0, ...) as a single reward model"),
}
# Stages whose folder is a plain policy (transformers causal LM) folder (and every registered online
# algorithm's final/: reinforce, ppo, grpo, ...).
POLICY_STAGES = ("sft", "dpo", "reinforce", "ppo")


def _label(stage: str) -> str:
    return LABELS.get(stage, f"a completed {stage} stage output")


def stage_output_problem(folder: str | Path, stage: str, required: Iterable[str] | None = None
                         ) -> tuple[str | None, dict[str, Any] | None]:
    """(why ``folder`` is not a complete output of ``stage``, or None; its manifest when it could be read)."""
    if str(folder).startswith("@rm_") and not Path(folder).exists():  # the pipeline's '@rm_scalar', unresolved
        return ("it is a placeholder that only the pipeline (`align run`) resolves to the reward model it trains; "
                "run alone, give the folder itself (e.g. runs/rm/scalar-<hash>)"), None
    folder = Path(folder)
    if not folder.exists():
        return "it does not exist", None
    if not folder.is_dir():
        return "it is a file, not a folder", None
    path = folder / MANIFEST
    if not path.is_file():
        return f"it has no {MANIFEST} (the stage never finished there, or did not write it)", None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"its {MANIFEST} cannot be read ({exc})", None
    if not isinstance(manifest, dict):
        return f"its {MANIFEST} is not a JSON object", None
    found = manifest.get("stage")
    if found != stage:
        hint = WRONG_STAGE_HINTS.get((stage, found), "")
        return f"its {MANIFEST} says stage {found!r}, not {stage!r}{hint}", manifest
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return f"its {MANIFEST} lists no files", manifest
    for name in REQUIRED_FILES.get(stage, ()) if required is None else required:
        if name not in files:
            return f"its {MANIFEST} does not list {name}", manifest
    root = folder.resolve()
    for name, meta in files.items():
        target = (folder / name).resolve()
        if not target.is_relative_to(root):
            return f"its {MANIFEST} lists {name!r}, outside the folder", manifest
        if not target.is_file():
            return f"{folder / name} (listed in its {MANIFEST}) is missing", manifest
        if not isinstance(meta, dict) or sha256_file(target) != meta.get("sha256"):
            return (f"{folder / name} changed since the stage wrote it (its SHA-256 is not the one in {MANIFEST}); "
                    "re-run the stage that wrote it"), manifest
    return None, manifest


def require_stage_output(folder: str | Path | None, stage: str, error: type[Exception], what: str = "--data",
                         required: Iterable[str] | None = None) -> dict[str, Any]:
    """The manifest of ``folder``, a complete, intact output of ``stage``; else raise ``error`` (one line
    naming ``what`` (the option or field), the folder and what is wrong)."""
    if folder is None or str(folder) == "":
        raise error(f"{what}: no folder given; it needs {_label(stage)}")
    problem, manifest = stage_output_problem(folder, stage, required)
    if problem is not None:
        raise error(f"{what} {folder} is not {_label(stage)}: {problem}")
    return manifest  # type: ignore[return-value]


def model_source_problem(spec: str) -> str | None:
    """Why ``spec`` (a hub id, a folder or a ``.gguf`` file) cannot be a policy, judged without loading it;
    None when it looks loadable. Hub ids are left to the model loader (cache, hub, offline copy)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return None if path.suffix == ".gguf" else "it is a file but not a .gguf model"
    if not path.is_dir():
        if path.suffix == ".gguf" or spec.startswith((".", "/", "~")) or not looks_like_repo_id(spec):
            return "no such file or folder (and not a Hugging Face model id)"
        return None  # a hub id
    if not (path / "config.json").is_file():
        hint = " (a training run's folder? its policy is in final/)" if (path / "final" / "config.json").is_file() else ""
        return f"the folder holds no config.json{hint}"
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"its config.json cannot be read ({exc})"
    if not isinstance(config, dict):
        return "its config.json is not a JSON object"
    if config.get("alignment_reward_kind"):
        return f"it is a {config['alignment_reward_kind']} reward model (written by `align rm`), not a policy"
    if not any(any(path.glob(pattern)) for pattern in ("*.safetensors", "*.safetensors.index.json", "*.bin")):
        return "the folder holds no weights (*.safetensors)"
    if (path / MANIFEST).is_file():
        try:
            found = json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("stage")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            return f"its {MANIFEST} cannot be read"
        if found not in POLICY_STAGES and found not in ALGORITHMS:
            return f"its {MANIFEST} says stage {found!r}, which writes no policy"
        problem, _ = stage_output_problem(path, found)
        if problem is not None:
            return problem
    return None


def require_model_source(spec: str, error: type[Exception], what: str = "--policy") -> None:
    """Raise ``error`` (one line naming ``what`` and ``spec``) when ``spec`` cannot be a policy to load."""
    problem = model_source_problem(spec)
    if problem is not None:
        raise error(f"{what} {spec} is not a loadable model (a hub id, a .gguf file or a model folder): {problem}")
