"""Training-health checks shared by the simulator and the device agent.

A federation that diverges (a loss of NaN/inf) or never learns (accuracy at chance) must
say so, naming the round and the client, instead of reporting numbers nobody can trust.
Both checks are pure: they return the warning lines and the caller logs them.
docs/design.md, "Stability".
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

# accuracy within this factor of chance (1 / classes) counts as "at chance"
CHANCE_FACTOR = 1.5
# rounds a federation may stay at chance before it is called stuck
CHANCE_GRACE_ROUNDS = 5


def loss_warning(rnd: int, client_id: str, metrics: Mapping[str, float]) -> str | None:
    """A warning line when a client's reported training loss is not a finite number."""
    loss = metrics.get("train_loss")
    if loss is None:
        return None
    try:
        value = float(loss)
    except (TypeError, ValueError):
        return f"round {rnd} client {client_id}: training loss {loss!r} is not a number"
    if not math.isfinite(value):
        return (f"round {rnd} client {client_id}: training loss is {value} (diverged); "
                f"lower train.lr or keep train.clip_grad_norm > 0")
    return None


def update_warning(rnd: int, client_id: str, params: Mapping[str, np.ndarray]) -> str | None:
    """A warning line when a client's trained weights hold NaN or inf (works for every
    strategy, whether or not it reports a loss); names the first bad tensor."""
    for name, value in params.items():
        arr = np.asarray(value)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            return (f"round {rnd} client {client_id}: update {name} holds non-finite values "
                    f"(diverged); lower train.lr or keep train.clip_grad_norm > 0")
    return None


def at_chance(accuracy: float, num_classes: int) -> bool:
    """True when ``accuracy`` is no better than 1.5x guessing among ``num_classes``."""
    return math.isfinite(accuracy) and accuracy <= CHANCE_FACTOR / max(num_classes, 2)


def chance_warning(rnd: int, who: str, accuracy: float, num_classes: int) -> str | None:
    """A warning line when ``who`` (e.g. "global model", "client 3") is still at chance after
    the grace rounds; None otherwise."""
    if rnd < CHANCE_GRACE_ROUNDS or not at_chance(accuracy, num_classes):
        return None
    return (f"round {rnd} {who}: accuracy {accuracy:.3f} is at chance (1/{num_classes} = "
            f"{1 / num_classes:.3f}); check train.lr, the labels and the input scaling")
