"""Finite outputs: before a stage marks its output complete, the weights and metrics it saved hold no NaN or inf.

A run that diverges (a learning rate of 1e30 is finite, so the config lets it through) trains without a crash:
the Trainer logs NaN losses and ``save_pretrained`` writes NaN weights that every later stage would load as a
"trained" model. :func:`check_output` reads back what the stage wrote (every ``*.safetensors`` file, one
``torch.isfinite(t).all()`` per tensor) and the metrics it is about to write, and raises
:class:`NonFiniteError` -- one line naming the stage, the file and the first bad tensor or metric -- so the
manifest is never written (the atomic output folder is dropped; earlier outputs and checkpoints stay).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from alignment.config import first_nonfinite_metric

DIVERGED = "training diverged (learning rate too high?)"
NOT_COMPLETE = "the output was not marked complete"


class NonFiniteError(ValueError):
    """A stage's weights or metrics hold NaN or inf: it diverged, and its output is not marked complete."""


def first_nonfinite_tensor(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an inf, else None."""
    for name, tensor in tensors:
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def check_tensors(tensors: Iterable[tuple[str, torch.Tensor]], stage: str, file: str | Path,
                  outcome: str = NOT_COMPLETE) -> None:
    """Raise :class:`NonFiniteError` naming ``stage``, ``file`` and the first tensor holding NaN or inf
    (``outcome``: what became of the output, said at the end)."""
    bad = first_nonfinite_tensor(tensors)
    if bad is not None:
        raise NonFiniteError(f"{stage}: {file}: tensor {bad!r} holds NaN or inf: {DIVERGED}; {outcome}")


def _saved_tensors(path: Path) -> Iterable[tuple[str, torch.Tensor]]:
    """Every tensor of a safetensors file, one at a time (never the whole file in memory at once)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        for name in fh.keys():  # noqa: SIM118 -- safe_open is not a mapping
            yield name, fh.get_tensor(name)


def check_output(folder: str | Path, stage: str, shown_as: str | Path, metrics: Mapping[str, Any] | None = None
                 ) -> None:
    """Check what a stage wrote to ``folder`` (its temporary output, shown as ``shown_as`` in the message) before
    it writes the manifest: every tensor of every ``*.safetensors`` file and every number of ``metrics`` (file
    name -> the metrics written there) is finite, else :class:`NonFiniteError`, one line."""
    folder, shown_as = Path(folder), Path(shown_as)
    for path in sorted(folder.glob("*.safetensors")):
        check_tensors(_saved_tensors(path), stage, shown_as / path.name)
    for name, value in (metrics or {}).items():
        bad = first_nonfinite_metric(value)
        if bad is not None:
            raise NonFiniteError(f"{stage}: {shown_as / name}: metric {bad[0]!r} is {bad[1]}: {DIVERGED}; {NOT_COMPLETE}")
