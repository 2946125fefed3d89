"""Who masks with whom: a seeded random regular graph of degree O(log n) (SecAgg+).

The round's devices are shuffled by a generator seeded from the round context (fleet, epoch,
round id: public, so every party derives the same graph) and placed on a ring; each is the
neighbour of the ``k / 2`` devices on either side (a circulant graph: every device has
exactly ``k`` neighbours, the relation is symmetric). ``k = min(n - 1, 3 ceil(log2 n))``
rounded up to even; for small rounds (``n <= 13``) the graph is complete.

Each device's secrets are shared among its neighbours with threshold
``t = max(floor(k / 2) + 1, k - floor((k + 1) / 3))``: any ``k - t`` of its neighbours may
drop and the secret is still recovered (on a complete graph, ``n >= 4``, that is a third of
the round: ``floor(n / 3)``), and since ``2t > k`` no server can collect ``t`` shares of a device's
self-mask seed *and* ``t`` of its mask key from honest neighbours (each reveals one of the
two, never both).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable

__all__ = ["default_degree", "neighbours", "threshold"]


def default_degree(n: int) -> int:
    if n <= 1:
        return 0
    k = 3 * math.ceil(math.log2(n))
    k += k % 2
    return min(n - 1, k)


def threshold(degree: int) -> int:
    """Shares needed to recover a secret dealt to ``degree`` neighbours: the most that
    tolerates ``floor((degree + 1) / 3)`` of them dropping (a third of a complete graph's
    round, the device itself included) while more than half are needed."""
    return max(degree // 2 + 1, degree - (degree + 1) // 3)


def neighbours(devices: Iterable[str], degree: int, seed: bytes) -> dict[str, frozenset[str]]:
    """Each device's neighbours (symmetric, ``degree`` each, rounded up to even below
    ``n - 1``)."""
    ring = sorted(set(devices))
    n = len(ring)
    if degree >= n - 1:
        return {d: frozenset(x for x in ring if x != d) for d in ring}
    degree += degree % 2
    rng = random.Random(hashlib.sha256(b"fedmq-secagg-graph|" + seed).digest())
    rng.shuffle(ring)
    half = degree // 2
    out: dict[str, frozenset[str]] = {}
    for i, d in enumerate(ring):
        out[d] = frozenset(ring[(i + o) % n] for o in range(-half, half + 1) if o)
    return out
