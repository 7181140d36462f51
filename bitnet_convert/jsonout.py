"""Strict JSON for `--json` outputs: what any JSON parser accepts, never Python's NaN / Infinity extensions.

`json.dumps` writes float('nan') as the bare word NaN, which is not JSON (jq, JavaScript and strict parsers
refuse the whole document). Here a non-finite number becomes null, so the document stays valid; a command
whose result can be NaN (verify's logits) must report that in a field of its own, since null alone cannot
say which of NaN, +inf or -inf it was. numpy scalars and arrays become plain numbers and lists.
"""

from __future__ import annotations

import json
import math

import numpy as np


def strict(value):
    """`value` with every non-finite float replaced by None and numpy values made plain Python (recursively)."""
    if isinstance(value, dict):
        return {key: strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(item) for item in value]
    if isinstance(value, np.ndarray):
        return strict(value.tolist())
    if isinstance(value, np.generic):
        return strict(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(value, **options) -> str:
    """json.dumps(value, allow_nan=False, **options) after `strict`: always a valid JSON document."""
    return json.dumps(strict(value), allow_nan=False, **options)
