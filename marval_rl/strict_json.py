"""JSON as a strict parser reads it: every file and line marval-rl writes goes through :func:`dumps`.

Python's ``json`` writes ``NaN`` and ``Infinity`` for non-finite floats, which no strict parser (jq,
JavaScript's JSON.parse, Go, Rust) accepts; a NaN metric or an overflowed summary would make a whole
metrics.jsonl or summary.json unreadable there. A non-finite number is written as ``null`` instead
(JSON's "no value"), and anything else that is not JSON raises as usual.
"""
from __future__ import annotations

import json
import math


def finite_or_none(obj):
    """``obj`` with every non-finite float (NaN, +-inf) inside dicts, lists and tuples replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def dumps(obj, **kwargs) -> str:
    """``json.dumps`` that never writes NaN / Infinity (they become null)."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)
