"""The collapse guard of the online loop: the known failure on this task is a policy emitting one symbol
until the length limit while the reward model's score climbs, so a run stops when distinct-2 falls or
the repetition rate rises past limits for ``patience`` consecutive steps."""

from __future__ import annotations

from dataclasses import dataclass


class CollapseDetected(RuntimeError):
    """The collapse guard stopped the run; the last healthy checkpoint is kept."""


@dataclass
class CollapseGuard:
    """Healthy = distinct-2 >= ``min_distinct2`` and repetition <= ``max_repetition``; ``patience``
    unhealthy steps in a row stop the run. ``streak`` is checkpointed with the trainer state."""

    min_distinct2: float
    max_repetition: float
    patience: int
    streak: int = 0

    def update(self, health: dict[str, float]) -> bool:
        """Record one step's text health; True when it is healthy."""
        healthy = health["distinct2"] >= self.min_distinct2 and health["repetition"] <= self.max_repetition
        self.streak = 0 if healthy else self.streak + 1
        return healthy

    def check(self, health: dict[str, float], step: int, last_healthy: str | None, sample: str) -> None:
        """Raise :class:`CollapseDetected` once the unhealthy streak reaches ``patience``."""
        if self.streak >= self.patience:
            raise CollapseDetected(
                f"collapse guard: distinct-2 {health['distinct2']:.2f} (min {self.min_distinct2}) / repetition "
                f"{health['repetition']:.2f} (max {self.max_repetition}) unhealthy for {self.streak} steps at "
                f"step {step}; last healthy checkpoint: {last_healthy or 'none (the starting policy)'}. "
                f"Sample: {sample[:120]!r}")
