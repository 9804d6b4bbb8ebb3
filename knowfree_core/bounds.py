"""Numeric ranges of config fields, checked in the schemas' ``__post_init__``.

Types alone let ``train.epochs=0`` or ``pool.num_actors=0`` through, and they fail much later:
a silent F1-0 model, or a Ray traceback deep in a job. Each schema lists its numeric fields by
kind (:data:`COUNT`, :data:`PROBABILITY` ...) once; :func:`check_bounds` turns a value outside
its range into a one-line ConfigError naming the key, which ``load_structured`` prefixes with
the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .errors import ConfigError


@dataclass(frozen=True)
class Bound:
    """``low <= value <= high`` (or ``<`` where open); None: no bound on that side."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    text: str = ""

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


#: Sizes and counts: epochs, batch sizes, actors, layers.
COUNT = Bound(low=1, text="at least 1")
#: Rates, weights, seconds, widths where 0 means "none" or "off".
NON_NEGATIVE = Bound(low=0, text=">= 0")
#: Probabilities and fractions.
PROBABILITY = Bound(low=0, high=1, text="in [0, 1]")
#: A probability that becomes a logit or a cut-off, where 0 and 1 have no meaning.
OPEN_PROBABILITY = Bound(low=0, high=1, low_open=True, high_open=True, text="in (0, 1)")
#: Strictly positive reals where 0 means nothing could happen (a timeout).
POSITIVE = Bound(low=0, low_open=True, text="> 0")


def check_bounds(section: str, values: Any, bounds: Mapping[str, Bound]) -> None:
    """Raise ConfigError for the first field of ``values`` outside its bound. None (an unset
    Optional) passes; a list is checked item by item. ``section`` prefixes the key
    (``train`` → ``train.epochs``), empty for a job's top-level fields."""
    prefix = f"{section}." if section else ""
    for name, bound in bounds.items():
        value = getattr(values, name)
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            # bool is an int: a flag is never a bounded number here.
            if item is None or isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            if not bound.holds(item):
                raise ConfigError(f"{prefix}{name} must be {bound.text}, got {value!r}")
