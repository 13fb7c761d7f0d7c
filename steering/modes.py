"""The steering fields' vocabulary and rules, without torch (a CLI's --help imports it).

Contract: `MODES` is the one list of steering modes (`Mode`), `LOGPROBS_SOURCES` the distributions logprobs can
report; `check_steering(...)` is the one rule of each steering field, one ValueError message per field, which
`request.SteeringParams` runs at construction and every entry point (HTTP, CLI, vLLM's extra_args) reaches.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

__all__ = ["DEFAULT_TOP_K", "LOGPROBS_SOURCES", "MAX_TOP_K", "MODES", "LogprobsSource", "Mode", "check_steering"]

Mode = Literal["off", "gated", "always", "random"]
MODES: tuple[str, ...] = get_args(Mode)  # the one list of modes
LogprobsSource = Literal["steered", "base"]
LOGPROBS_SOURCES: tuple[str, ...] = get_args(LogprobsSource)
DEFAULT_TOP_K = 5  # the paper: RL's token is among the base top-5 at decision points
MAX_TOP_K = 1000


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_steering(mode: Any = None, threshold: Any = None, top_k: Any = None, rate: Any = None,
                   logprobs: Any = "steered", trace: Any = False) -> None:
    """The rules of each steering field (None: left to the default or the adapter), one ValueError message each.
    `SteeringParams` runs them; the HTTP model runs them on a partial `steering` object (mode may be left out)."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"steering mode {mode!r} is unknown: use one of {', '.join(MODES)}")
    if threshold is not None and (not _number(threshold) or math.isnan(threshold) or threshold < 0):
        raise ValueError(f"steering threshold must be a number >= 0 (nats; inf disables the gate), got {threshold!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or not 0 <= top_k <= MAX_TOP_K):
        raise ValueError(f"steering top_k must be an integer from 1 to {MAX_TOP_K} (0: a teacher's full "
                         f"distribution), got {top_k!r}")
    if rate is not None and not (_number(rate) and 0 <= rate <= 1):
        raise ValueError(f"steering rate must be a probability in [0, 1], got {rate!r}")
    if logprobs not in LOGPROBS_SOURCES:
        raise ValueError(f"steering logprobs must be 'steered' or 'base' (the distribution logprobs report), "
                         f"got {logprobs!r}")
    if not isinstance(trace, bool):
        raise ValueError(f"steering trace must be true or false, got {trace!r}")
