"""Stable seeds derived from integers and names: identical in every process, on every machine.

Python's hash() is salted per process, so it cannot name a random stream that two machines must agree on.
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 63-bit generator seed for the parts (joined with '/'), e.g. derive_seed(seed, parameter_name)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
