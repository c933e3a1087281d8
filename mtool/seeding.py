"""Seeds named by what they are for, so random draws do not depend on the order work is done in.

Every random choice mtool makes (DARE's keep masks, DELLA's draws, PEFT-style DARE combinations of adapters)
draws from a generator seeded by the run's seed and the name of what is drawn for (a tensor, a module, a block
of positions): the same seed gives the same bytes whatever the order, the device or the number of threads.
"""

from __future__ import annotations

import hashlib


def hashed_seed(*parts: object) -> int:
    """A 64-bit seed named by ``parts``: the first 8 bytes (little-endian) of sha256 of ``"p1:p2:..."``."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little")


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one tensor (torch generators take signed 64-bit seeds): ``hashed_seed(seed, name) >> 1``."""
    return hashed_seed(seed, name) >> 1
