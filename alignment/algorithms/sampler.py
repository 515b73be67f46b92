"""The online loop's prompt order: seeded batches of prompt indices that a resumed run draws exactly as an
uninterrupted one would."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PromptSampler:
    """Batches of prompt indices from a seeded permutation per epoch; ``epoch`` and ``position`` are
    checkpointed, so a resumed run draws exactly the batches an uninterrupted one would."""

    n: int
    seed: int
    epoch: int = 0
    position: int = 0

    def next(self, batch_size: int) -> np.ndarray:
        """The next ``batch_size`` indices; a new epoch (a new permutation) when the current one runs short."""
        if self.position + batch_size > self.n:
            self.epoch, self.position = self.epoch + 1, 0
        order = np.random.default_rng(self.seed + self.epoch).permutation(self.n)
        idx = order[self.position:self.position + batch_size]
        self.position += batch_size
        return idx
