"""A compact index of the data ids in a log: sorted 64-bit keys in numpy arrays.

Integer ids are their own keys (exact: 8 bytes per row). String ids are keyed by a 64-bit hash
of their UTF-8 bytes and keep the row that holds them (8 + 8 bytes per row), so that a hash
match is confirmed against the stored id before it counts as a duplicate: a hash collision
never drops or refuses a row.

New keys collect in a small sorted run that is merged into the main run when it grows past
1/16 of it, so the index costs O(log n) per lookup and amortized O(1) copies per row.
"""

from __future__ import annotations

import numpy as np

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
ROW_BITS = 40  # a location is (shard number << 40) | row: 2^40 rows per shard, 2^24 shards
_MIN_RUN = 1 << 16


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
        self._runs = [self._empty(), self._empty()]  # main, recent

    def _empty(self):
        return np.zeros(0, np.uint64), (None if self.exact else np.zeros(0, np.uint64))

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
        (mk, ml), (rk, rl) = self._runs
        rk, rl = _merge(rk, rl, k, locs)
        if len(rk) > max(_MIN_RUN, len(mk) // 16):
            mk, ml = _merge(mk, ml, rk, rl)
            rk, rl = self._empty()
        self._runs = [(mk, ml), (rk, rl)]

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
