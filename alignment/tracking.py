"""Experiment tracking: every stage is an MLflow run; a pipeline or a comparison is their parent.

What is logged, and where it comes from:

* a stage's config as params (flattened, ``rewards.0.kind``), its tags (``stage``, ``stage_key``,
  ``reused``, ``out_dir``, the Prefect flow run id when there is one), its summary's numbers as metrics
  (``summary/...``), its cost (``footprint/seconds``, ``footprint/peak_rss_mb``) and its small output
  files (plots, manifests, reports, metrics.jsonl) as artifacts -- never weights; a policy stage logs
  ``policy-ref.json`` instead, the stage folder by reference;
* the online loops' per-step metrics (``reward``, ``kl``, ``rewards/<name>/mean`` ...) at their step,
  and their held-out evaluations as ``heldout/...``;
* the Trainer stages' (reward models, DPO, SFT) logged losses through :func:`trainer_callback`;
* other trackers (``report_to``: tensorboard, trackio, wandb) get the online loops' metrics from
  here and the Trainer stages' through the Trainer's own ``report_to``.

The default store is a SQLite file under the runs folder (``sqlite:///<runs>/mlflow.db``, artifacts in
``<runs>/mlartifacts``): no server. ``tracking.uri`` or ``MLFLOW_TRACKING_URI`` point at a server;
``tracking=none`` turns tracking off. Nothing here is allowed to stop a training run: a tracking call
that fails is logged once as a warning and tracking is off for the rest of that run.

Runs nest through a context: :func:`stage_run` opens a run as the child of the run open around it (or
of the parent named by the process's configuration, which is how a stage launched as a subprocess
finds its pipeline). :func:`configure` sets the process's tracking and exports it in the environment
(``ALIGNMENT_TRACKING``), so subprocesses inherit it. Without :func:`configure` (the library used from
Python) tracking is off.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from alignment.config import ConfigModel
from alignment.console import quiet_loggers
from alignment.io import read_manifest

log = logging.getLogger(__name__)

TRACKING_ENV = "ALIGNMENT_TRACKING"  # JSON: the resolved settings (+ the parent run id) for subprocesses
PARENT_TAG = "mlflow.parentRunId"  # how MLflow marks a nested run
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
MAX_ARTIFACT_BYTES = 5_000_000
ARTIFACT_SUFFIXES = (".png", ".json", ".jsonl", ".md", ".html", ".csv", ".yaml", ".txt")
OTHER_TRACKERS = ("tensorboard", "trackio", "wandb")
MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


class TrackingConfig(ConfigModel):
    """Where runs are tracked. ``tracking=none`` (or ``off``) turns tracking off; ``tracking=mlflow`` is the default."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["mlflow", "none"] = Field(
        "mlflow", description="mlflow (default; a SQLite file under the runs folder unless uri is given) or none.")
    uri: str | None = Field(None, description="MLflow tracking URI (http://host:5000, sqlite:///file.db); default "
                            "$MLFLOW_TRACKING_URI, else sqlite:///<runs>/mlflow.db.")
    experiment: str = Field("alignment", min_length=1, description="MLflow experiment name.")
    report_to: list[Literal["tensorboard", "trackio", "wandb"]] = Field(
        default_factory=list, description="Other trackers, passed to the Trainer stages' report_to and fed the "
        "online loops' metrics (tensorboard writes under <runs>/tensorboard; wandb runs offline unless WANDB_MODE "
        "says otherwise).")
    register_model: str | None = Field(
        "alignment-policy", description="Registered-model name under which a pipeline run registers its tuned "
        "policy (by reference to its stage folder, with the verdict as tags); null: do not register.")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if value is None or value is False or (isinstance(value, str) and value.lower() in ("none", "off", "false")):
            return {"backend": "none"}
        if isinstance(value, str) and value.lower() == "mlflow":
            return {}
        if isinstance(value, str):
            raise ValueError(f"tracking: expected 'mlflow', 'none' or a mapping (uri, experiment, report_to, "
                             f"register_model), got {value!r}")
        return value

    @property
    def enabled(self) -> bool:
        return self.backend != "none"

    def resolved_uri(self, runs_root: str | Path) -> str:
        """``uri``, else ``$MLFLOW_TRACKING_URI``, else ``<runs_root>/mlflow.db``: refused (``NotOurs``) when that
        file exists and this project did not create it, recorded as ours when it is about to be created
        (``alignment.ownership.claim_store``)."""
        if self.uri:
            return self.uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        from alignment.ownership import claim_store

        path = (Path(runs_root).expanduser() / "mlflow.db").resolve()
        claim_store(path)
        return f"sqlite:///{path}"


# ----------------------------------------------------------------------------------------- settings


def _quiet_libraries() -> None:
    """MLflow's and alembic's INFO lines (database creation, 'View run at ...') are not ours to print."""
    quiet_loggers(("mlflow", "alembic"))


def configure_flow(config: TrackingConfig, runs_root: str | Path) -> dict[str, Any] | None:
    """A flow's tracking: its ``tracking`` parameter, except that ``ALIGNMENT_TRACKING=none`` in the environment
    turns off the *default* one (the test suite's setting); an explicit parameter always wins."""
    off = config == TrackingConfig() and os.environ.get(TRACKING_ENV) == "none"
    return configure("none" if off else config, runs_root)


def configure(config: TrackingConfig | Mapping[str, Any] | str | None, runs_root: str | Path = "runs", *,
              parent_run_id: str | None = None) -> dict[str, Any] | None:
    """Set this process's tracking (and its subprocesses', through ``ALIGNMENT_TRACKING``); returns the settings."""
    global _settings
    if not isinstance(config, TrackingConfig):
        config = TrackingConfig.model_validate(config if config is not None else "none")
    if not config.enabled:
        _settings = None
        os.environ[TRACKING_ENV] = "none"
        return None
    runs_root = Path(runs_root).resolve()
    uri = config.resolved_uri(runs_root)
    problem = store_problem(uri, runs_root)
    if problem is not None:
        log.warning("tracking: %s; this run is not tracked (tracking=none to silence this)", problem)
        _settings = None
        os.environ[TRACKING_ENV] = "none"
        return None
    _settings = {"uri": uri, "experiment": config.experiment,
                 "report_to": list(config.report_to), "register_model": config.register_model,
                 "runs_root": str(runs_root), "parent_run_id": parent_run_id}
    os.environ[TRACKING_ENV] = json.dumps(_settings)
    _quiet_libraries()
    return dict(_settings)


_settings: dict[str, Any] | None = None


def store_problem(uri: str, runs_root: str | Path) -> str | None:
    """Why the tracking store cannot be used (checked in a second, before any stage: MLflow itself retries a
    missing server or an unwritable database for minutes), else None."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if path.is_dir():
            return f"the MLflow store {uri} is a folder, not a database file"
        if path.exists():
            return None if os.access(path, os.W_OK) else f"the MLflow store {uri} is not writable"
        parent = path.parent
        if parent == Path(runs_root).resolve() and not parent.exists():
            parent.mkdir(parents=True, exist_ok=True)  # the runs folder, which the stages are about to make anyway
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            return f"cannot create the MLflow store {uri} (its folder is missing or not writable)"
        return None
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as response:  # noqa: S310
                if response.status == 200:
                    return None
                return f"the MLflow server {uri} answered {response.status} on /health"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            return f"the MLflow server {uri} is unreachable ({reason})"
    return None


def settings() -> dict[str, Any] | None:
    """The process's tracking settings (None: off): :func:`configure`'s, else inherited from the environment."""
    global _settings
    if _settings is None:
        raw = os.environ.get(TRACKING_ENV, "none")
        if raw and raw != "none":
            try:
                _settings = json.loads(raw)
                _quiet_libraries()
            except json.JSONDecodeError:
                log.warning("tracking: ignoring an unreadable %s", TRACKING_ENV)
                os.environ[TRACKING_ENV] = "none"
    return _settings


def report_to() -> list[str]:
    """The other trackers the Trainer stages report to (their ``report_to``); [] when off."""
    s = settings()
    return list(s["report_to"]) if s else []


def subprocess_env() -> dict[str, str]:
    """Environment entries for a stage launched as a subprocess: its runs become children of the run open here."""
    s = settings()
    if s is None:
        return {TRACKING_ENV: "none"}
    parent = current()
    return {TRACKING_ENV: json.dumps({**s, "parent_run_id": parent.run_id if parent else s.get("parent_run_id"),
                                      "tags": current_tags()})}


# ---------------------------------------------------------------------------------------- flattening


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "l": [{"k": 2}]}`` -> ``{"a.b": 1, "l.0.k": 2}`` (empty containers stay as ``[]``/``{}``)."""
    out: dict[str, Any] = {}
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, list | tuple) and value:
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}.{i}" if prefix else str(i)))
    else:
        out[prefix] = value
    return out


def numeric(value: Any) -> float | None:
    """A finite number (bools count as 0/1), else None: what a metric can hold."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def clean_key(key: str) -> str:
    """A name MLflow accepts (alphanumerics, ``_ - . : /`` and spaces): ``proxy RM 'scalar'`` -> ``proxy RM scalar``."""
    return re.sub(r"[^\w\-. :/]", "", key).strip() or "_"


def metric_items(metrics: Mapping[str, Any], prefix: str = "", sep: str = "/") -> dict[str, float]:
    """The finite numbers of a (nested) record, keys joined with ``sep``; strings, None and NaN are left out."""
    out = {}
    for key, value in flatten(metrics).items():
        x = numeric(value)
        if x is not None and key:
            name = key.replace(".", sep)
            out[clean_key(f"{prefix}{name}")] = x
    return out


# ------------------------------------------------------------------------------------------------ runs


class _OtherTrackers:
    """The online loops' metrics for the trackers in ``report_to`` (tensorboard, or the wandb-style trackio/wandb)."""

    def __init__(self, names: list[str], run_name: str, params: dict[str, Any], runs_root: str):
        self.writers: list[tuple[str, Any]] = []
        for name in names:
            try:
                if name == "tensorboard":
                    from torch.utils.tensorboard import SummaryWriter

                    self.writers.append((name, SummaryWriter(log_dir=str(Path(runs_root) / "tensorboard" / run_name))))
                else:  # trackio and wandb share wandb's init/log/finish API
                    import importlib

                    module = importlib.import_module(name)
                    kwargs = {"project": "alignment", "name": run_name, "config": params}
                    if name == "wandb" and not os.environ.get("WANDB_MODE"):
                        kwargs["mode"] = "offline"
                    module.init(**kwargs)
                    self.writers.append((name, module))
            except Exception as exc:  # noqa: BLE001 - a missing optional tracker must not stop training
                log.warning("tracking: report_to %s is not available (%s: %s); skipped", name,
                            type(exc).__name__, exc)

    def log(self, metrics: dict[str, float], step: int | None) -> None:
        for name, writer in self.writers:
            if name == "tensorboard":
                for key, value in metrics.items():
                    writer.add_scalar(key, value, global_step=step)
            else:
                writer.log(metrics, step=step)

    def close(self) -> None:
        for name, writer in self.writers:
            with contextlib.suppress(Exception):
                writer.close() if name == "tensorboard" else writer.finish()


class Run:
    """One MLflow run, written through ``MlflowClient`` (no global active run, so threads and nesting are safe)."""

    def __init__(self, client: Any, run_id: str, experiment_id: str, uri: str, name: str,
                 others: _OtherTrackers | None = None):
        self.client, self.run_id, self.experiment_id, self.uri, self.name = client, run_id, experiment_id, uri, name
        self.others = others
        self.broken = False
        self._params: set[str] = set()

    @property
    def page(self) -> str:
        """The run's path in the MLflow UI: ``#/experiments/<id>/runs/<id>``."""
        return f"#/experiments/{self.experiment_id}/runs/{self.run_id}"

    @property
    def url(self) -> str | None:
        """The run's page on the tracking server; None for a store without one (a SQLite file): nothing serves
        a link to it until ``mlflow ui`` runs, see :attr:`where`."""
        if self.uri.startswith(("http://", "https://")):
            return f"{self.uri.rstrip('/')}/{self.page}"
        return None

    @property
    def where(self) -> str:
        """Where a person finds the run: its URL on the tracking server, else the command that serves the store
        (``mlflow ui --backend-store-uri sqlite:///...``) and the run's page in that UI."""
        if self.url is not None:
            return self.url
        return f"`mlflow ui --backend-store-uri {self.uri}`, then open {MLFLOW_UI}/{self.page}"

    def _safe(self, what: str, fn, *args, **kwargs) -> Any:
        if self.broken:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking never stops a run
            self.broken = True
            log.warning("tracking: %s failed for MLflow run %s at %s (%s: %s); tracking is off for the rest of "
                        "this run", what, self.run_id, self.uri, type(exc).__name__, str(exc)[:300])
            return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = []
        for key, value in flatten(params).items():
            if not key or key in self._params:
                continue
            text = json.dumps(value) if isinstance(value, list | dict) else str(value)
            items.append(Param(clean_key(key), text[:MAX_PARAM_CHARS]))
            self._params.add(key)
        for i in range(0, len(items), 100):
            self._safe("log_params", self.client.log_batch, self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, prefix: str = "",
                    others: bool = True) -> None:
        from mlflow.entities import Metric

        values = metric_items(metrics, prefix)
        if not values:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, int(step or 0)) for k, v in values.items()]
        for i in range(0, len(batch), 500):
            self._safe("log_metrics", self.client.log_batch, self.run_id, metrics=batch[i:i + 500])
        if others and self.others is not None:
            self._safe("report_to", self.others.log, values, step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(clean_key(str(k)), str(v)[:5000]) for k, v in tags.items() if v is not None]
        if items:
            self._safe("set_tags", self.client.log_batch, self.run_id, tags=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._safe("log_artifact", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self._safe("log_dict", self.client.log_dict, self.run_id, obj, artifact_file)

    def log_outputs(self, folder: str | Path, artifact_path: str | None = None, depth: int = 1) -> int:
        """Log a stage folder's small files (plots, manifests, reports, jsonl) -- never weights; returns how many."""
        folder = Path(folder)
        if not folder.is_dir():
            return 0
        n = 0
        for path in sorted(folder.iterdir()):
            if path.name.startswith("."):
                continue
            if path.is_file() and path.suffix in ARTIFACT_SUFFIXES and path.stat().st_size <= MAX_ARTIFACT_BYTES:
                self.log_artifact(path, artifact_path)
                n += 1
            elif path.is_dir() and depth > 0:
                n += self.log_outputs(path, f"{artifact_path}/{path.name}" if artifact_path else path.name, depth - 1)
        return n

    def end(self, status: str = "FINISHED") -> None:
        """End the run (tried even after an earlier call failed: a run left RUNNING would look alive)."""
        if self.others is not None:
            self.others.close()
        self.broken = False
        self._safe("end", self.client.set_terminated, self.run_id, status)


_stack: contextvars.ContextVar[tuple[Run, ...]] = contextvars.ContextVar("tracking_runs", default=())
_tags: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("tracking_tags", default=None)
_process_tags: list[dict[str, str]] = []


@contextlib.contextmanager
def tagged(**tags: Any) -> Iterator[None]:
    """Tags for every run opened inside the block (here, in other threads, and in subprocesses launched with
    :func:`subprocess_env`): e.g. the pipeline's name of the stage (``stage_name=rm_scalar``)."""
    merged = {**current_tags(), **{k: str(v) for k, v in tags.items() if v is not None}}
    token = _tags.set(merged)
    _process_tags.append(merged)
    try:
        yield
    finally:
        _process_tags.remove(merged)
        _tags.reset(token)


def current_tags() -> dict[str, str]:
    tags = _tags.get() or (_process_tags[-1] if _process_tags else {})
    s = settings()
    return {**(s.get("tags") or {} if s else {}), **tags}
_process_runs: list[Run] = []  # the runs opened with process_wide=True (a pipeline's): seen from every thread


def current() -> Run | None:
    """The innermost open run of this context (or the process-wide one a pipeline opened), else None."""
    stack = _stack.get()
    if stack:
        return stack[-1]
    return _process_runs[-1] if _process_runs else None


def _client(uri: str):
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the stage lines say where runs are
    from mlflow.tracking import MlflowClient

    _quiet_libraries()  # mlflow sets its own logger's level when first imported
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client: Any, s: dict[str, Any]) -> str:
    experiment = client.get_experiment_by_name(s["experiment"])
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if s["uri"].startswith("sqlite:") or s["uri"].startswith("file:"):
        location = (Path(s["runs_root"]) / "mlartifacts").resolve().as_uri()  # not ./mlruns under the cwd
    try:
        return client.create_experiment(s["experiment"], artifact_location=location)
    except Exception:  # noqa: BLE001 - another process created it first
        experiment = client.get_experiment_by_name(s["experiment"])
        if experiment is None:
            raise
        return experiment.experiment_id


@contextlib.contextmanager
def stage_run(name: str, *, params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None,
              parent_run_id: str | None = None, process_wide: bool = False) -> Iterator[Run | None]:
    """Open a run named ``name`` for the block (None when tracking is off or the store cannot be reached).

    The run is the child of ``parent_run_id``, else of the run open around it, else of the configured
    parent. It ends FINISHED, FAILED on an exception, KILLED on Ctrl-C. ``process_wide`` makes it the
    parent of runs opened in other threads too (a pipeline's Prefect tasks).
    """
    s = settings()
    if s is None:
        yield None
        return
    outer = current()
    parent = parent_run_id or (outer.run_id if outer else s.get("parent_run_id"))
    try:
        import mlflow  # noqa: F401 - fail here, with a clear message, if it is missing

        client = _client(s["uri"])
        experiment_id = _experiment_id(client, s)
        run_tags = {**current_tags(), **({PARENT_TAG: parent} if parent else {}),
                    **{k: str(v) for k, v in (tags or {}).items() if v is not None}}
        info = client.create_run(experiment_id, run_name=name, tags=run_tags).info
    except Exception as exc:  # noqa: BLE001 - tracking never stops a run
        log.warning("tracking: could not open an MLflow run at %s (%s: %s); tracking is off for the rest of this "
                    "process", s["uri"], type(exc).__name__, str(exc)[:300])
        configure("none")
        yield None
        return
    param_dict = dict(params or {})
    others = _OtherTrackers(s["report_to"], f"{name}-{info.run_id[:8]}", param_dict, s["runs_root"]) \
        if s.get("report_to") else None
    run = Run(client, info.run_id, experiment_id, s["uri"], name, others)
    if param_dict:
        run.log_params(param_dict)
    token = _stack.set((*_stack.get(), run))
    if process_wide:
        _process_runs.append(run)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if process_wide:
            _process_runs.remove(run)
        _stack.reset(token)
        run.end(status)


def log_metrics(metrics: Mapping[str, Any], step: int | None = None, prefix: str = "") -> None:
    """Log to the open run, if any (the online loops' per-step records)."""
    run = current()
    if run is not None:
        run.log_metrics(metrics, step, prefix)


# ------------------------------------------------------------------------------------ stages and models


def _stage_key_of(out_dir: Path) -> tuple[str | None, str | None]:
    """(stage key, stage) from the manifest of ``out_dir`` or, for the online stages, of ``out_dir/final``."""
    manifest = read_manifest(out_dir) or read_manifest(out_dir / "final") or {}
    return manifest.get("stage_key"), manifest.get("stage")


def record_result(run: Run | None, result: Any) -> None:
    """Tag, measure and attach a finished stage: its key, summary numbers, cost and small output files."""
    if run is None or result is None or not hasattr(result, "out_dir"):
        return
    out_dir = Path(result.out_dir)
    key, stage = _stage_key_of(out_dir)
    run.set_tags({"stage_key": key, "stage": stage, "out_dir": str(out_dir.resolve()),
                  "reused": str(bool(getattr(result, "reused", False))).lower()})
    run.log_metrics(getattr(result, "summary", None) or {}, prefix="summary/", others=False)
    run.log_metrics(getattr(result, "footprint", None) or {}, prefix="footprint/", others=False)
    run.log_outputs(out_dir)
    run._safe("rename", run.client.update_run, run.run_id, name=f"{run.name} {out_dir.name}")
    final = out_dir / "final"
    if final.is_dir() and any(final.glob("*.safetensors")):
        run.log_dict({"folder": str(final.resolve()), "stage_key": key, "stage": stage}, "policy-ref.json")


def find_stage_run(stage_key: str) -> str | None:
    """The newest run of this process's experiment tagged with ``stage_key`` (a stage may have run in a subprocess)."""
    s = settings()
    if s is None:
        return None
    try:
        client = _client(s["uri"])
        experiment = client.get_experiment_by_name(s["experiment"])
        if experiment is None:
            return None
        runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.stage_key = '{stage_key}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else None
    except Exception as exc:  # noqa: BLE001
        log.warning("tracking: could not search runs at %s (%s)", s["uri"], exc)
        return None


def register_policy(policy_dir: str | Path, stage_key: str, tags: Mapping[str, Any]) -> str | None:
    """Register a tuned policy as a model version by reference (``policy-ref.json`` of its stage run); the version.

    The version's source is the stage run's ``policy-ref.json`` artifact, which names the stage folder: the
    weights are not copied. Its tags carry ``tags`` (the verdict) and the folder.
    """
    s = settings()
    if s is None or not s.get("register_model"):
        return None
    run_id = find_stage_run(stage_key)
    if run_id is None:
        log.warning("tracking: no run with stage_key %s to register the policy from", stage_key[:12])
        return None
    try:
        client = _client(s["uri"])
        name = s["register_model"]
        from mlflow.exceptions import MlflowException

        with contextlib.suppress(MlflowException):  # it exists already
            client.create_registered_model(name, description="Policies tuned by the alignment pipeline; each "
                                           "version points at its stage folder (policy-ref.json).")
        source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/policy-ref.json"
        version_tags = {**{clean_key(k): str(v)[:5000] for k, v in tags.items() if v is not None},
                        "folder": str(Path(policy_dir).resolve()), "stage_key": stage_key}
        version = client.create_model_version(name, source=source, run_id=run_id, tags=version_tags)
        return str(version.version)
    except Exception as exc:  # noqa: BLE001
        log.warning("tracking: could not register the policy (%s: %s)", type(exc).__name__, str(exc)[:300])
        return None


def trainer_callback():
    """A ``transformers`` callback that sends the Trainer's logged numbers (loss, grad_norm, eval_*) to the open run."""
    from transformers import TrainerCallback

    class TrackingCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            run = current()
            if run is not None and logs and state.is_world_process_zero:
                run.log_metrics(logs, step=state.global_step, prefix="train/", others=False)

    return TrackingCallback()
