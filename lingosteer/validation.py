"""One line for a stored document that its pydantic model refused (manifests, interference data).

Loaders raise their own error classes with the file's path in front; `first_problem` says what
is wrong and where, from pydantic's first error (the first failing field, in field order).
"""

import reprlib
from typing import NamedTuple

from pydantic import ValidationError


class Problem(NamedTuple):
    message: str
    field: str | None  # the top-level field holding a bad value; None: a missing field, or the whole document
    raised: Exception | None  # what a model validator raised (`message` is its text), else None


def first_problem(invalid: ValidationError) -> Problem:
    error = invalid.errors()[0]
    raised = error.get("ctx", {}).get("error")
    if isinstance(raised, Exception):  # a validator's own check: its words, its class
        return Problem(str(raised), None, raised)
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]).lstrip(".")
    if error["type"] == "missing":
        return Problem(f"missing field {where!r}", None, None)
    got = f"(got {reprlib.repr(error['input'])})"
    if not where:
        return Problem(f"{error['msg']} {got}", None, None)
    return Problem(f"field {where!r}: {error['msg']} {got}", str(error["loc"][0]), None)
