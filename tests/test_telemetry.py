"""Telemetry is off for MLflow (as for Prefect) in every entry point: MLflow 3 reads MLFLOW_DISABLE_TELEMETRY
or DO_NOT_TRACK=true, not the DO_NOT_TRACK=1 the project sets for Prefect. Checked with MLflow's own
``is_telemetry_disabled()`` in a fresh interpreter whose environment says nothing about telemetry or CI
(MLflow also switches itself off under pytest or CI, which would hide a missing setting)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# What MLflow reads as "telemetry off" or "in CI / a test": none of it may leak in from this process.
_MLFLOW_OFF_SIGNALS = ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "CI",
                       "CIRCLECI", "GITLAB_CI", "JENKINS_URL", "TRAVIS", "TF_BUILD", "BITBUCKET_BUILD_NUMBER",
                       "CODEBUILD_BUILD_ARN", "BUILDKITE", "TEAMCITY_VERSION", "CLOUD_RUN_EXECUTION",
                       "RUNBOT_HOST_URL", "RUNBOT_BUILD_NAME", "RUNBOT_WORKER_ID", "_MLFLOW_TESTING_TELEMETRY")


def _telemetry_disabled_after(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in _MLFLOW_OFF_SIGNALS}
    env["PYTHONPATH"] = str(ROOT)
    probe = (f"{code}\nfrom mlflow.telemetry.utils import is_telemetry_disabled\n"
             "import os\nprint(is_telemetry_disabled(), os.environ.get('DO_NOT_TRACK'))")
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def test_the_probe_sees_telemetry_on_without_the_project():
    """The check can fail: MLflow alone, in this clean environment, has telemetry on."""
    assert _telemetry_disabled_after("pass") == ["False", "None"]


@pytest.mark.parametrize("entry", ["import cli.main", "import alignment.tracking", "import tasks"])
def test_every_entry_point_turns_mlflow_telemetry_off(entry):
    # and Prefect's as before (DO_NOT_TRACK=1)
    assert _telemetry_disabled_after(entry) == ["True", "1"]


def test_explicit_settings_are_kept():
    env = {k: v for k, v in os.environ.items() if k not in _MLFLOW_OFF_SIGNALS}
    env.update(PYTHONPATH=str(ROOT), MLFLOW_DISABLE_TELEMETRY="false", DO_NOT_TRACK="0")
    probe = "import alignment, os; print(os.environ['MLFLOW_DISABLE_TELEMETRY'], os.environ['DO_NOT_TRACK'])"
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["false", "0"], out.stderr[-2000:]
