"""A compact index of the data ids in a log: sorted 64-bit keys in numpy arrays.

Integer ids are their own keys (exact: 8 bytes per row). String ids are keyed by a 64-bit hash
of their UTF-8 bytes and keep the row that holds them (8 + 8 bytes per row), so that a hash
match is confirmed against the stored id before it counts as a duplicate: a hash collision
never drops or refuses a row.

Keys are kept in sorted runs whose sizes shrink at least fourfold from one run to the next (a
new batch is a run; a run is merged into the one before it once it reaches a quarter of its
size), so a lookup is a binary search in O(log n) runs and each key is copied O(log n) times.
"""

from __future__ import annotations

import numpy as np

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
ROW_BITS = 40  # a location is (shard number << 40) | row: 2^40 rows per shard, 2^24 shards


def _mix(z: np.ndarray) -> np.ndarray:
    # splitmix64 finalizer: every input bit affects every output bit
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def id_keys(stored: np.ndarray, kind: str) -> np.ndarray:
    """uint64 keys of ids in their storage form (int64 [n] or NUL-padded uint8 [n, w])."""
    if kind == "int":
        return np.ascontiguousarray(stored, np.int64).view(np.uint64)
    raw = np.ascontiguousarray(stored, np.uint8)
    n, w = raw.shape
    pad = -w % 8
    if pad:
        raw = np.concatenate([raw, np.zeros((n, pad), np.uint8)], 1)
    words = raw.view("<u8")
    with np.errstate(over="ignore"):
        h = np.full(n, _GOLDEN, np.uint64)
        for j in range(words.shape[1]):
            h = _mix(h ^ words[:, j]) + _GOLDEN
    return h


def _merge(ka, la, kb, lb):
    """Merge two sorted runs (keys, optional locations) into one."""
    pos = np.searchsorted(ka, kb) + np.arange(len(kb))
    keys = np.empty(len(ka) + len(kb), np.uint64)
    mask = np.ones(len(keys), bool)
    mask[pos] = False
    keys[mask], keys[pos] = ka, kb
    locs = None
    if la is not None:
        locs = np.empty(len(keys), np.uint64)
        locs[mask], locs[pos] = la, lb
    return keys, locs


class IdIndex:
    """Keys (and, for hashed ids, locations) of every id of a log, for duplicate checks."""

    def __init__(self, kind: str):
        self.kind = kind
        self.exact = kind == "int"
        self._runs: list = []  # [(keys uint64 sorted, locations uint64 or None)], largest first

    def __len__(self) -> int:
        return sum(len(k) for k, _ in self._runs)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + (0 if l is None else l.nbytes) for k, l in self._runs)

    def add(self, keys: np.ndarray, shard: int, rows: np.ndarray) -> None:
        """Add the keys of ids stored at ``rows`` of shard number ``shard``."""
        order = np.argsort(keys, kind="stable")
        k = keys[order]
        locs = None
        if not self.exact:
            locs = (np.uint64(shard) << np.uint64(ROW_BITS)) | rows.astype(np.uint64)[order]
        self._runs.append((k, locs))
        while len(self._runs) > 1 and 4 * len(self._runs[-1][0]) >= len(self._runs[-2][0]):
            (ka, la), (kb, lb) = self._runs[-2:]
            self._runs[-2:] = [_merge(ka, la, kb, lb)]

    def member(self, keys: np.ndarray) -> np.ndarray:
        """Bool [n]: which keys are indexed (exact for integer ids)."""
        out = np.zeros(len(keys), bool)
        for k, _ in self._runs:
            pos = np.minimum(np.searchsorted(k, keys), max(len(k) - 1, 0))
            if len(k):
                out |= k[pos] == keys
        return out

    def candidates(self, keys: np.ndarray) -> list[tuple[int, int, int]]:
        """``(position in keys, shard, row)`` of every indexed id whose hash equals one of ``keys``."""
        out = []
        for k, l in self._runs:
            lo = np.searchsorted(k, keys, "left")
            hi = np.searchsorted(k, keys, "right")
            for i in np.nonzero(hi > lo)[0]:
                for loc in l[lo[i] : hi[i]]:
                    loc = int(loc)
                    out.append((int(i), loc >> ROW_BITS, loc & ((1 << ROW_BITS) - 1)))
        return out
