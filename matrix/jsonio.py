"""JSON files that are valid (no NaN) and never half-written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from lingosteer.files import write_text_atomic


def json_safe(value):
    """NaN and infinities become null (JSON has no NaN); numpy scalars and containers are converted."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def write_json_atomic(path: Path, data: dict) -> None:
    """`data` as JSON (NaN as null), written so that readers never see half a file."""
    write_text_atomic(path, json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")
