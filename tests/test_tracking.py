"""Tracking (``alignment.tracking``) against a local SQLite MLflow store: runs nest, params/metrics/artifacts
land where they should, weights never do, a broken store never stops a stage, ``tracking=none`` logs nothing."""

from __future__ import annotations

import json
import sys
import types

import pytest

from alignment import tracking
from alignment.config import ConfigError
from alignment.tracking import TrackingConfig


@pytest.fixture
def store(tmp_path, monkeypatch):
    """Tracking configured on a SQLite file in a temporary runs folder; reset afterwards."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = tmp_path / "runs"
    runs.mkdir()
    s = tracking.configure(TrackingConfig(), runs)
    yield runs, s
    tracking.configure("none")


def _client(s):
    from mlflow.tracking import MlflowClient

    return MlflowClient(s["uri"])


def _runs(s):
    client = _client(s)
    experiment = client.get_experiment_by_name(s["experiment"])
    return client.search_runs([experiment.experiment_id]) if experiment else []


def test_config_shorthands_and_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert not TrackingConfig.model_validate("none").enabled
    assert not TrackingConfig.model_validate("off").enabled
    assert TrackingConfig.model_validate("mlflow").enabled and TrackingConfig().enabled
    assert TrackingConfig().resolved_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert TrackingConfig().resolved_uri(tmp_path) == "http://127.0.0.1:5999"
    assert TrackingConfig(uri="sqlite:///x.db").resolved_uri(tmp_path) == "sqlite:///x.db"  # explicit wins
    with pytest.raises(ValueError, match="expected 'mlflow', 'none'"):
        TrackingConfig.model_validate("wandb")
    with pytest.raises(ValueError, match="report_to"):
        TrackingConfig(report_to=["neptune"])
    from alignment.pipeline import PipelineConfig

    with pytest.raises((ConfigError, ValueError), match="tracking"):
        PipelineConfig.model_validate({"tracking": {"backend": "mlflow", "nope": 1}})


def test_flatten_and_metric_items_by_hand():
    assert tracking.flatten({"a": {"b": 1}, "l": [{"k": 2}, 3], "e": [], "s": "x"}) == \
        {"a.b": 1, "l.0.k": 2, "l.1": 3, "e": [], "s": "x"}
    assert tracking.metric_items({"reward": 0.5, "rewards": {"gold": {"mean": 0.25}}, "text": "no",
                                  "none": None, "nan": float("nan"), "ok": True}, prefix="p/") == \
        {"p/reward": 0.5, "p/rewards/gold/mean": 0.25, "p/ok": 1.0}
    assert tracking.metric_items({"proxy RM 'scalar'": 1}, prefix="verdict/") == {"verdict/proxy RM scalar": 1.0}


def test_off_logs_nothing_and_writes_no_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.configure("none", tmp_path)
    with tracking.stage_run("x", params={"a": 1}) as run:
        assert run is None
        tracking.log_metrics({"reward": 1.0}, step=1)  # a no-op, not an error
    assert not (tmp_path / "mlflow.db").exists() and list(tmp_path.iterdir()) == []


def test_nested_runs_params_metrics_and_status(store):
    runs, s = store
    with tracking.stage_run("pipeline", params={"options": {"seed": 3}}, process_wide=True) as parent:
        with tracking.stage_run("reinforce", params={"rewards": [{"kind": "gold", "weight": 1.0}]}) as child:
            for step in (1, 2, 3):
                tracking.log_metrics({"reward": step / 10, "rewards": {"gold": {"mean": step / 4}}}, step=step)
        with pytest.raises(RuntimeError), tracking.stage_run("score"):
            raise RuntimeError("boom")
    client = _client(s)
    by_name = {r.info.run_name: r for r in _runs(s)}
    assert set(by_name) == {"pipeline", "reinforce", "score"}
    assert by_name["reinforce"].data.tags[tracking.PARENT_TAG] == parent.run_id
    assert by_name["score"].data.tags[tracking.PARENT_TAG] == parent.run_id
    assert tracking.PARENT_TAG not in by_name["pipeline"].data.tags
    assert by_name["reinforce"].data.params == {"rewards.0.kind": "gold", "rewards.0.weight": "1.0"}
    history = client.get_metric_history(child.run_id, "reward")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert [m.value for m in client.get_metric_history(child.run_id, "rewards/gold/mean")] == [0.25, 0.5, 0.75]
    assert by_name["score"].info.status == "FAILED" and by_name["reinforce"].info.status == "FINISHED"
    # artifacts go under the runs folder, not ./mlruns in the working directory
    assert (runs / "mlflow.db").is_file()
    assert client.get_experiment(parent.experiment_id).artifact_location.startswith((runs / "mlartifacts").as_uri())


def test_a_stage_is_one_run_with_its_key_outputs_and_no_weights(store, tiny_model, tmp_path):
    """A real stage function (the data stage, decorated with exclusive_stage) becomes a tracked run."""
    from alignment.data import DataConfig, run_data_stage

    runs, s = store
    result = run_data_stage(DataConfig(), tmp_path / "data")
    (run,) = _runs(s)
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    assert run.data.tags["stage_key"] == manifest["stage_key"] and run.data.tags["reused"] == "false"
    assert run.data.params["source"] == "demo"
    assert run.data.metrics["summary/n_pairs"] == result.summary["n_pairs"]
    assert run.info.run_name == f"data {result.out_dir.name}"
    artifacts = {a.path for a in _client(s).list_artifacts(run.info.run_id)}
    assert "manifest.json" in artifacts and not any(p.endswith((".safetensors", ".parquet")) for p in artifacts)


def test_policy_ref_and_model_version_point_at_the_folder(store, tmp_path):
    from alignment.stage import StageResult

    runs, s = store
    out = tmp_path / "reinforce"
    (out / "final").mkdir(parents=True)
    (out / "final" / "model.safetensors").write_bytes(b"\0" * 64)
    (out / "final" / "manifest.json").write_text(json.dumps({"stage_key": "k" * 64, "stage": "reinforce"}))
    with tracking.stage_run("reinforce") as run:
        tracking.record_result(run, StageResult(out_dir=out, summary={"steps": 2}))
    client = _client(s)
    paths = {a.path for a in client.list_artifacts(run.run_id)}
    assert "policy-ref.json" in paths and "final" in paths
    assert {a.path for a in client.list_artifacts(run.run_id, "final")} == {"final/manifest.json"}  # no weights
    version = tracking.register_policy(out / "final", "k" * 64, {"verdict": "no clear change"})
    assert version == "1"
    mv = client.get_model_version("alignment-policy", "1")
    assert mv.run_id == run.run_id and mv.source.endswith("policy-ref.json")
    assert mv.tags["verdict"] == "no clear change" and mv.tags["folder"] == str((out / "final").resolve())


def test_an_unusable_store_is_found_at_once_and_the_run_goes_on_untracked(tmp_path, monkeypatch, caplog):
    import socket

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = tmp_path / "not-a-db"
    folder.mkdir()
    assert tracking.configure(TrackingConfig(uri=f"sqlite:///{folder}"), tmp_path) is None
    assert "is a folder, not a database file" in caplog.text
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert tracking.configure(TrackingConfig(uri=f"http://127.0.0.1:{port}"), tmp_path) is None
    assert f"the MLflow server http://127.0.0.1:{port} is unreachable" in caplog.text
    assert tracking.settings() is None


def test_a_store_failing_mid_run_never_stops_the_stage(store, monkeypatch, caplog):
    def broken(uri):
        raise OSError("disk full")

    monkeypatch.setattr(tracking, "_client", broken)
    with tracking.stage_run("x") as run:
        assert run is None
        value = 42
    assert value == 42 and "could not open an MLflow run" in caplog.text and "disk full" in caplog.text
    assert tracking.settings() is None  # and the next stages do not try again


def test_report_to_feeds_other_trackers(store, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw["name"].split("-")[0])),
                                 log=lambda m, step=None: calls.append(("log", step, m)),
                                 finish=lambda: calls.append(("finish",)))
    monkeypatch.setitem(sys.modules, "trackio", fake)
    runs, s = store
    tracking.configure(TrackingConfig(report_to=["trackio"]), runs)
    with tracking.stage_run("grpo"):
        tracking.log_metrics({"reward": 0.5}, step=4)
    assert calls == [("init", "grpo"), ("log", 4, {"reward": 0.5}), ("finish",)]


def test_subprocesses_inherit_the_settings_and_the_open_run(store):
    runs, s = store
    with tracking.stage_run("pipeline") as parent, tracking.tagged(stage_name="rm_scalar"):
        env = tracking.subprocess_env()
        with tracking.stage_run("rm") as child:
            pass
    inherited = json.loads(env[tracking.TRACKING_ENV])
    assert inherited["uri"] == s["uri"] and inherited["parent_run_id"] == parent.run_id
    assert inherited["tags"] == {"stage_name": "rm_scalar"}
    assert _client(s).get_run(child.run_id).data.tags["stage_name"] == "rm_scalar"
    assert tracking.current_tags() == {}


def test_where_a_run_is_found_sqlite_store_and_server(store):
    """A SQLite store has no server: the run's line names the command that serves it and the run's page there,
    never a link that leads nowhere; a tracking server's run is its URL."""
    runs, s = store
    with tracking.stage_run("pipeline") as run:
        pass
    page = f"#/experiments/{run.experiment_id}/runs/{run.run_id}"
    assert run.page == page and run.url is None
    assert run.where == (f"`mlflow ui --backend-store-uri sqlite:///{(runs / 'mlflow.db').resolve()}`, then open "
                         f"http://127.0.0.1:5000/{page}")
    on_server = tracking.Run(None, "abc", "7", "http://mlflow.internal:5000/", "pipeline")
    assert on_server.url == on_server.where == "http://mlflow.internal:5000/#/experiments/7/runs/abc"
