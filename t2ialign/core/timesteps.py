"""Timestep-grid specs: the reference ``[[start, end, step]]`` / ``["random", lo, hi, n]`` format.

A spec is a list of entries that concatenate:

* ``[start, end_exclusive, step]`` -> ``range(start, end_exclusive, step)``;
* ``["random", lo, hi_inclusive, n]`` -> ``n`` draws of ``random.randint(lo, hi_inclusive)``
  from one ``random.Random(seed)`` shared by all random entries of the spec (so a spec with two
  random entries does not draw the same numbers twice);
* ``["stratified", lo, hi_inclusive, n]`` -> ``n`` integers, one drawn uniformly in each of
  ``n`` equal slices of ``[lo, hi_inclusive + 1)`` (same generator). An unbiased estimate of the
  uniform-in-t integral like ``"random"``, but with the spread of a grid: for smooth integrands
  its error falls much faster than ``1/sqrt(n)``.

The reference default ``[[1, 999, 50]]`` is the 20 timesteps ``1, 51, ..., 951``.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from t2ialign.core.errors import ConfigError

ACCEPTED_FORMS = (
    "each entry must be [start, end_exclusive, step] (integers, step != 0), "
    '["random", lo, hi_inclusive, n] or ["stratified", lo, hi_inclusive, n] (integers, lo <= hi, n >= 1), '
    "e.g. [[1, 999, 50]] or [[\"stratified\", 1, 999, 20]]"
)


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but [True, 5, 1] is certainly a typo, not a range
    return isinstance(value, int) and not isinstance(value, bool)


def _entry_error(index: int, entry: Any, what: str) -> ConfigError:
    return ConfigError(f"timestep spec entry {index} {entry!r} is malformed: {what}",
                       where=f"timestep spec entry {index}", fix=ACCEPTED_FORMS)


def parse_timesteps(spec: Sequence[Any], *, seed: int = 0) -> list[int]:
    """Expand a timestep spec into the list of integer timestep indices it names.

    ``seed`` seeds the single ``random.Random`` used by every ``"random"`` entry, so the same
    spec and seed always give the same list. Raises :class:`ConfigError` naming the first bad
    entry when the spec is malformed or names no timestep at all.
    """
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence):
        raise ConfigError(f"timestep spec must be a list of entries, got {spec!r}",
                          where="timestep spec", fix=ACCEPTED_FORMS)
    rng = random.Random(seed)
    out: list[int] = []
    for index, entry in enumerate(spec):
        if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence):
            raise _entry_error(index, entry, "not a list")
        if len(entry) > 0 and entry[0] in ("random", "stratified"):
            kind = entry[0]
            if len(entry) != 4 or not all(_is_int(v) for v in entry[1:]):
                raise _entry_error(index, entry, f'a "{kind}" entry needs three integers lo, hi, n')
            lo, hi, n = entry[1], entry[2], entry[3]
            if lo > hi:
                raise _entry_error(index, entry, f"lo={lo} is above hi={hi}")
            if n < 1:
                raise _entry_error(index, entry, f"n={n} draws nothing")
            if kind == "random":
                out.extend(rng.randint(lo, hi) for _ in range(n))
            else:
                width = (hi - lo + 1) / n
                # min(): float rounding must not push the last slice's draw past hi
                out.extend(min(hi, lo + int((k + rng.random()) * width)) for k in range(n))
        else:
            if len(entry) != 3 or not all(_is_int(v) for v in entry):
                raise _entry_error(index, entry, "a range entry needs exactly three integers")
            start, end, step = entry
            if step == 0:
                raise _entry_error(index, entry, "step is 0")
            if len(range(start, end, step)) == 0:
                # an empty range is always a typo (e.g. swapped start/end), never intended
                raise _entry_error(index, entry, "the range is empty")
            out.extend(range(start, end, step))
    if not out:
        raise ConfigError("timestep spec is empty", where="timestep spec", fix=ACCEPTED_FORMS)
    return out
