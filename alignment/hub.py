"""Is the Hugging Face hub reachable? Answered in seconds, not after minutes of client retries."""

from __future__ import annotations

import functools
import logging
import os
import re
import socket
from urllib.parse import urlparse

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
# A hub repo id: "name" or "owner/name", letters, digits, "-", "_", ".".
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")


def looks_like_repo_id(spec: str) -> bool:
    return bool(_REPO_ID.match(spec)) and not spec.endswith((".json", ".jsonl", ".csv", ".parquet", ".gguf"))


def offline_requested() -> bool:
    return any(os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}
               for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


@functools.lru_cache(maxsize=8)
def _reachable(host: str, port: int, timeout: float) -> tuple[bool, str]:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, f"connected to {host}:{port}"
    except OSError as exc:  # DNS failure, refused, unreachable, timeout
        return False, f"{host}:{port} unreachable ({type(exc).__name__}: {exc})"


def hub_status(timeout: float = 3.0) -> tuple[bool, str]:
    """(reachable, reason). Honours ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT``; one TCP connect, no retries."""
    if offline_requested():
        return False, "offline mode requested by HF_HUB_OFFLINE/HF_DATASETS_OFFLINE"
    endpoint = os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT)
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    return _reachable(host, port, timeout)


def hub_reachable(timeout: float = 3.0) -> bool:
    ok, reason = hub_status(timeout)
    if not ok:
        log.info("Hugging Face hub not reachable: %s", reason)
    return ok
