"""Tiny stand-ins for SmolLM2 in fast tests: a byte-level BPE tokenizer shaped like SmolLM2's and a
2-layer, 64-dim Llama with random weights."""

from __future__ import annotations

import functools
import json
from pathlib import Path

# SmolLM2-135M-Instruct's chat template (ChatML with a default system prompt).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@functools.lru_cache(maxsize=4)
def _trained_backend(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from alignment.data import _builtin_path

    corpus = []
    for line in _builtin_path("demo").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        corpus += [row["prompt"], row["response"]]
    corpus += ["system", "user", "assistant", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 600):
    """SmolLM2-like: eos == pad == <|im_end|>, bos <|im_start|>, ChatML template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained_backend(vocab_size)),
                                  eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|im_start|>",
                                  unk_token="<|endoftext|>")
    tok.chat_template = SMOLLM2_TEMPLATE
    return tok


def tiny_model_dir(folder: Path, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """Save a random 2-layer, 64-dim Llama causal LM with the tiny tokenizer to ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
