"""The preference store: the on-policy pairs every round labelled, one parquet per round, with provenance.

Layout (``<store>`` is ``rounds.store``, by default ``<runs_dir>/preference-store``)::

    <store>/inbox/                          pairs people or other labellers drop in (read, never changed)
    <store>/<experiment>/store.json         which configuration these rounds belong to
    <store>/<experiment>/round-001.parquet  round 1's labelled pairs (prompt, chosen, rejected + provenance)
    <store>/<experiment>/claimed/round-001/ copies of the inbox files round 1 picked up
    <store>/<experiment>/inbox-claims.json  inbox file sha256 -> the round that picked it up
    <store>/<experiment>/rounds/round-001.json  the round's record, written last: the round is complete
    <store>/<experiment>/report/            the rounds report

``<experiment>`` is ``rounds-<digest>`` of the configuration the rounds compute with (the pipeline's
sections and the rounds section without its operational fields), so a changed configuration starts its own
line of rounds and never overwrites another's pairs. The data stage reads a round's files as
``extra_train`` (:meth:`PreferenceStore.train_files`): round n trains on rounds 1..n and the inbox files
claimed up to n, a fixed list, so re-running an old round finds the same inputs (and its cache).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from alignment.io import sha256_file, write_json

STORE_MARK = b"alignment.preference-store"  # in each round file's parquet metadata: a file we wrote
INBOX_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class StoreError(ValueError):
    """The preference store cannot be used as asked (a foreign file where a round file goes, a bad record)."""


def _replace_file(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` in one rename (a reader never sees half a file)."""
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def is_store_file(path: Path) -> bool:
    """Whether ``path`` is a round file this project wrote (its parquet metadata carries the mark)."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:  # noqa: BLE001 -- unreadable: not ours
        return False
    return STORE_MARK in meta


class PreferenceStore:
    """One experiment's rounds inside a store folder (see the module docstring)."""

    def __init__(self, root: str | Path, experiment: str):
        self.root = Path(root)
        self.experiment = experiment
        self.dir = self.root / experiment
        self.inbox = self.root / "inbox"

    # ---- paths
    def round_file(self, n: int) -> Path:
        return self.dir / f"round-{n:03d}.parquet"

    def record_file(self, n: int) -> Path:
        return self.dir / "rounds" / f"round-{n:03d}.json"

    @property
    def claims_file(self) -> Path:
        return self.dir / "inbox-claims.json"

    @property
    def report_dir(self) -> Path:
        return self.dir / "report"

    def open(self, description: dict[str, Any]) -> None:
        """Create the folders (and ``store.json`` describing the experiment) if they are missing."""
        self.inbox.mkdir(parents=True, exist_ok=True)
        (self.dir / "rounds").mkdir(parents=True, exist_ok=True)
        meta = self.dir / "store.json"
        if not meta.is_file():
            write_json(meta, {"created_by": "alignment-pipeline", "experiment": self.experiment,
                              "created_at": datetime.now(UTC).isoformat(timespec="seconds"), **description})

    # ---- rounds
    def append_round(self, n: int, pairs: str | Path) -> bool:
        """Put round ``n``'s labelled pairs (a parquet the labels stage wrote) into the store; idempotent: the
        same content again changes nothing (False), a different one (the round re-ran) replaces it (True)."""
        src, dst = Path(pairs), self.round_file(n)
        if not is_store_file(src):
            raise StoreError(f"{src}: not a labelled-pairs file of this project (no store mark)")
        if dst.exists():
            if not is_store_file(dst):
                raise StoreError(f"{dst} exists and is not a round file this project wrote: move it away "
                                 "(the store never replaces a file it did not write)")
            if sha256_file(dst) == sha256_file(src):
                return False
        dst.parent.mkdir(parents=True, exist_ok=True)
        _replace_file(src, dst)
        return True

    def claims(self) -> dict[str, dict[str, Any]]:
        if not self.claims_file.is_file():
            return {}
        try:
            data = json.loads(self.claims_file.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise StoreError(f"{self.claims_file}: not readable JSON ({exc})") from None
        return data if isinstance(data, dict) else {}

    def claim_inbox(self, n: int) -> list[Path]:
        """Pick up the inbox files no round has claimed yet for round ``n`` (copied under ``claimed/``, the
        originals left where they are); the round's claimed copies, those of an earlier call included."""
        claims = self.claims()
        if self.inbox.is_dir():
            for path in sorted(self.inbox.iterdir()):
                if not path.is_file() or path.name.startswith(".") or path.suffix.lower() not in INBOX_SUFFIXES:
                    continue
                sha = sha256_file(path)
                if sha in claims:
                    continue
                copy = self.dir / "claimed" / f"round-{n:03d}" / path.name
                copy.parent.mkdir(parents=True, exist_ok=True)
                _replace_file(path, copy)
                claims[sha] = {"file": path.name, "round": n, "copy": str(copy.relative_to(self.dir)),
                               "claimed_at": datetime.now(UTC).isoformat(timespec="seconds")}
                write_json(self.claims_file, claims)  # after each copy: a kill loses nothing claimed
        return self.claimed(n)

    def claimed(self, n: int) -> list[Path]:
        """The copies of the inbox files round ``n`` picked up."""
        return [self.dir / c["copy"] for c in sorted(self.claims().values(), key=lambda c: c["copy"]) if c["round"] == n]

    def unclaimed_inbox(self) -> list[Path]:
        claimed = set(self.claims())
        return [p for p in sorted(self.inbox.iterdir()) if p.is_file() and not p.name.startswith(".")
                and p.suffix.lower() in INBOX_SUFFIXES and sha256_file(p) not in claimed] if self.inbox.is_dir() else []

    def train_files(self, n: int) -> list[str]:
        """What round ``n``'s reward model trains on besides the base data: rounds 1..n and the inbox files
        claimed by rounds 1..n, in a fixed order (a round that labelled no pair adds no file)."""
        files = [self.round_file(i) for i in range(1, n + 1)
                 if self.round_file(i).is_file() and pq.read_metadata(self.round_file(i)).num_rows > 0]
        files += [self.dir / c["copy"] for c in sorted(self.claims().values(), key=lambda c: c["copy"])
                  if c["round"] <= n and (self.dir / c["copy"]).is_file()]
        return [str(f) for f in files]

    # ---- records
    def write_record(self, n: int, record: dict[str, Any]) -> Path:
        path = self.record_file(n)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, record)
        return path

    def record(self, n: int) -> dict[str, Any] | None:
        path = self.record_file(n)
        try:
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except ValueError:
            return None  # a damaged record: the round is not complete

    def records(self) -> list[dict[str, Any]]:
        out = []
        for path in sorted((self.dir / "rounds").glob("round-*.json")):
            rec = self.record(int(path.stem.split("-")[1]))
            if rec is not None:
                out.append(rec)
        return out
