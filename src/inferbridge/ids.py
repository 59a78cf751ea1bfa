"""Identifiers: request ids and completion ids, unique across requests and processes.

A random per-process prefix plus a counter: as unique as uuid4 for our purposes, and
cheaper to make for every request.
"""

from __future__ import annotations

import itertools
import os

_PREFIX = os.urandom(6).hex()
_COUNTER = itertools.count(1)


def new_id() -> str:
    return f"{_PREFIX}{next(_COUNTER):010x}"
