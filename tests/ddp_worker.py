"""One process of a data-parallel `align reinforce` run, for tests/test_reinforce_ddp.py.

Runs the CLI as `python -m cli` would, then saves this process's final policy weights to
``$DDP_TEST_DUMP/rank<R>.safetensors`` so the test can check that every replica ends identical.
``$DDP_TEST_STOP_AFTER`` interrupts the run after that many steps (to test resuming).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import alignment.algorithms.online
import alignment.algorithms.reinforce as R
from cli.main import main

captured = []
_load, _train = alignment.algorithms.online.load_causal_lm, R.train_reinforce


def _capturing_load(*args, **kwargs):
    model, tokenizer = _load(*args, **kwargs)
    captured.append(model)  # the first load is the policy, a second one the frozen KL reference
    return model, tokenizer


def _train_maybe_interrupted(config, out_dir, **kwargs):
    stop = os.environ.get("DDP_TEST_STOP_AFTER")
    return _train(config, out_dir, stop_after=int(stop) if stop else None, **kwargs)


if __name__ == "__main__":
    from safetensors.torch import save_file

    alignment.algorithms.online.load_causal_lm, R.train_reinforce = _capturing_load, _train_maybe_interrupted
    code = main(sys.argv[1:])
    rank = int(os.environ.get("RANK", "0"))
    # clone: tied embeddings share storage, which safetensors refuses to save twice
    weights = {k: v.detach().clone().contiguous() for k, v in captured[0].state_dict().items()}
    save_file(weights, str(Path(os.environ["DDP_TEST_DUMP"]) / f"rank{rank}.safetensors"))
    sys.exit(code)
