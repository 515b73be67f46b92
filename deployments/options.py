"""The options of serving the deployments, defined once for ``align serve`` and ``python -m deployments.serve``.

Importing this module imports neither Prefect nor the flows, so the ``align`` parser stays fast.
"""

from __future__ import annotations

import argparse
import os

from alignment.presets import PRESETS


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--cron, --timezone, --retrain-preset, --runs-dir (defaults from ALIGNMENT_RETRAIN_CRON / ALIGNMENT_RUNS_DIR)."""
    parser.add_argument("--cron", default=os.environ.get("ALIGNMENT_RETRAIN_CRON", "0 3 * * 1"),
                        help="schedule of the retrain deployment (default: $ALIGNMENT_RETRAIN_CRON, else Mondays 03:00)")
    parser.add_argument("--timezone", default="UTC")
    parser.add_argument("--retrain-preset", default="demo-rounds", choices=sorted(PRESETS),
                        help="preset the retrain deployment's rounds run with (default demo-rounds)")
    parser.add_argument("--runs-dir", default=os.environ.get("ALIGNMENT_RUNS_DIR", "runs"), metavar="DIR",
                        help="where every stage writes (default: $ALIGNMENT_RUNS_DIR, else runs)")
    return parser
