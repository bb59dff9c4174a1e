"""The log reader: a snapshot of every shard's committed rows; it never writes to the log.

Statistics (the per-layer empirical Fisher and its eigendecomposition) are derived data: the
reader uses a saved version whose row stamp equals its snapshot, else computes them in memory
from the shards' Fisher sums (or their rows). Saving a version is opt-in
(``statistics(cache=True)``) and fails soft on a read-only log.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any, NamedTuple

import numpy as np

from jaxinf._src import store_files as files
from jaxinf._src import store_format as fmt
from jaxinf._src import writer as _writer
from jaxinf._src.statistics import covariance_from_sums, fisher_eigh


class LayerStatistics(NamedTuple):
    """Fitted statistics of one layer (float64, host)."""

    covariance: np.ndarray  # [d, d]: F = mean_i g_i g_i^T
    eigenvalues: np.ndarray  # [d], ascending
    eigenvectors: np.ndarray  # [d, d], columns
    count: int  # rows the statistics cover


class Shard(NamedTuple):
    name: str
    rows: int  # committed rows
    grads: Any  # ts.TensorStore [capacity, D] (storage dtype)
    ids: Any  # ts.TensorStore [capacity] (or [capacity, max_bytes] for string ids)


def statistics_version(stamp: dict) -> str:
    """Directory name of the statistics fitted over ``{shard: rows}``."""
    text = json.dumps(stamp, sort_keys=True).encode()
    return "v-" + hashlib.sha256(text).hexdigest()[:20]


class Log:
    """A read-only view of a log: metadata, committed rows of every shard, statistics."""

    def __init__(self, path: str, meta: dict, shards: list[Shard]):
        self.path, self.meta, self.shards = path, meta, shards
        self.layers = fmt.layers_from_meta(meta)
        self.dim, self.dtype = meta["dim"], meta["dtype"]
        self.chunk_rows = meta["chunk_rows"]
        self.num_rows = sum(s.rows for s in shards)
        self._stats = None  # statistics() memo: a Log is a snapshot of the committed rows

    @property
    def metadata(self) -> dict:
        return self.meta

    @property
    def projection(self) -> dict:
        return self.meta["projection"]

    def ids(self) -> np.ndarray:
        """Data ids of all committed rows, shard by shard (the global row order)."""
        kind = self.meta["ids"]["kind"]
        parts = [fmt.ids_from_storage(s.ids[: s.rows].read().result(), kind) for s in self.shards]
        if not parts:
            return np.zeros((0,), np.int64 if kind == "int" else object)
        return np.concatenate(parts)

    def ids_at(self, rows) -> np.ndarray:
        """Data ids of the given global rows (any shape; the order of ``Log.ids()``).

        Reads and decodes only those ids, not every id of the log.
        """
        rows = np.asarray(rows, np.int64)
        flat = rows.reshape(-1)
        kind = self.meta["ids"]["kind"]
        if flat.size and (flat.min() < 0 or flat.max() >= self.num_rows):
            raise ValueError(f"rows out of [0, {self.num_rows}) in ids_at")
        starts = np.cumsum([0] + [s.rows for s in self.shards])
        which = np.searchsorted(starts, flat, "right") - 1
        out = np.zeros(flat.shape, np.int64 if kind == "int" else object)
        for k in np.unique(which):
            sel = np.nonzero(which == k)[0]
            local = flat[sel] - starts[k]
            uniq, inv = np.unique(local, return_inverse=True)
            got = fmt.ids_from_storage(self.shards[k].ids[uniq].read().result(), kind)
            out[sel] = got[inv]
        return out.reshape(rows.shape)

    def read(
        self,
        shard: str | None = None,
        start: int = 0,
        stop: int | None = None,
        as_layers: bool = True,
    ):
        """Read committed rows ``[start, stop)`` of one shard (or of the global row order).

        Returns ``(grads, ids)`` with ``grads`` a ``{layer: [n, k_out, k_in]}`` dict of numpy arrays
        of the log dtype (``as_layers=True``) or the packed ``[n, D]`` rows.
        """
        if shard is None:
            if len(self.shards) == 1:
                return self.read(self.shards[0].name, start, stop, as_layers)
            stop = self.num_rows if stop is None else stop
            rows, ids, base = [], [], 0
            for s in self.shards:
                a, b = max(start - base, 0), min(stop - base, s.rows)
                if a < b:
                    r, i = self.read(s.name, a, b, as_layers=False)
                    rows.append(r)
                    ids.append(i)
                base += s.rows
            empty = np.zeros((0, self.dim), fmt.DTYPES[self.dtype][1])
            rows = np.concatenate(rows) if rows else empty
            ids = np.concatenate(ids) if ids else np.zeros((0,))
        else:
            names = [s.name for s in self.shards]
            if shard not in names:
                raise ValueError(f"no shard {shard!r} in {self.path} (shards: {names})")
            s = self.shards[names.index(shard)]
            stop = s.rows if stop is None else stop
            if not 0 <= start <= stop <= s.rows:
                raise ValueError(
                    f"rows [{start}, {stop}) out of the {s.rows} committed rows of shard {shard!r}"
                )
            rows = fmt.values(s.grads[start:stop].read().result(), self.dtype)
            ids = fmt.ids_from_storage(s.ids[start:stop].read().result(), self.meta["ids"]["kind"])
        if not as_layers:
            return rows, ids
        return {
            l.path: rows[:, l.offset : l.offset + l.dim].reshape(-1, l.k_out, l.k_in)
            for l in self.layers
        }, ids

    def statistics(self, refresh: bool = False, cache: bool = False) -> dict[str, LayerStatistics]:
        """Empirical Fisher of the projected gradients per layer, with its eigendecomposition.

        Uses the saved version covering exactly this snapshot's rows if there is one (unless
        ``refresh``); otherwise sums the shards' Fisher sums (recomputed in memory from the rows
        where a shard has none for its committed rows), divides by the row count and
        diagonalizes in float64.

        Args:
          refresh: ignore saved statistics and recompute.
          cache: save the result as a new version under ``statistics/`` (one directory rename;
            old versions are never edited). A failure to write (read-only or full filesystem) is
            a warning, not an error.
        """
        if self._stats is not None and not refresh:
            if cache:
                self._save(self._stats)
            return self._stats
        stats = None if refresh else self._load()
        if stats is None:
            stats = self._fit()
            if cache:
                self._save(stats)
        self._stats = stats
        return stats

    def _stamp(self) -> dict:
        return {s.name: s.rows for s in self.shards}

    def derived_dir(self, kind: str, params: dict) -> str:
        """Directory of the version of derived data ``kind`` computed with ``params``.

        The name hashes this snapshot's row counts with ``params``, so a version is found
        only by a snapshot with exactly the rows it covers: appending rows invalidates it.
        """
        key = {"rows": self._stamp(), "layers": [l.path for l in self.layers], **params}
        return os.path.join(self.path, kind, statistics_version(key))

    def load_derived(self, kind: str, params: dict) -> dict[str, np.ndarray] | None:
        """Arrays of a saved version of derived data (see ``save_derived``), or None."""
        d = self.derived_dir(kind, params)
        if not os.path.isdir(d):
            return None
        rec = files.read_json(os.path.join(d, "record.json"), kind, fmt.LogFormatError)
        if rec.get("rows") != self._stamp() or rec.get("params") != params:
            raise fmt.LogFormatError(
                f"{d}/record.json covers rows {rec.get('rows')!r} with {rec.get('params')!r}, "
                f"not this log's rows {self._stamp()} with {params!r}; delete {d} to have it "
                "recomputed"
            )
        try:
            return {name: files.read_array(os.path.join(d, name), kind) for name in rec["arrays"]}
        except (fmt.LogFormatError, KeyError) as e:
            raise fmt.LogFormatError(f"{e}; delete {d} to have it recomputed") from None

    def save_derived(self, kind: str, params: dict, arrays: dict[str, np.ndarray]) -> bool:
        """Save derived data as a new version ``<log>/<kind>/v-<hash>`` (one directory rename).

        A failure to write (read-only or full filesystem) is a warning and returns False.
        """
        d = self.derived_dir(kind, params)
        record = {"rows": self._stamp(), "params": params, "arrays": sorted(arrays)}
        try:
            return files.write_version(
                os.path.dirname(d), os.path.basename(d), arrays, "record.json", record
            )
        except OSError as e:
            warnings.warn(
                f"{kind} of {self.path} not saved ({e}); it is recomputed when needed",
                RuntimeWarning,
                stacklevel=3,
            )
            return False

    def _load(self) -> dict[str, LayerStatistics] | None:
        d = os.path.join(self.path, "statistics", statistics_version(self._stamp()))
        if not os.path.isdir(d):
            return None
        rec = files.read_json(os.path.join(d, "statistics.json"), "statistics", fmt.LogFormatError)
        if rec.get("rows") != self._stamp() or rec.get("layers") != [l.path for l in self.layers]:
            raise fmt.LogFormatError(
                f"{d}/statistics.json covers {rec.get('rows')!r}, not this log's rows "
                f"{self._stamp()}; delete {d} to have the statistics recomputed"
            )
        out = {}
        try:
            for i, l in enumerate(self.layers):
                ld = os.path.join(d, f"layer_{i}")
                out[l.path] = LayerStatistics(
                    *(
                        files.read_array(os.path.join(ld, name), "statistics")
                        for name in ("covariance", "eigenvalues", "eigenvectors")
                    ),
                    self.num_rows,
                )
        except fmt.LogFormatError as e:
            raise fmt.LogFormatError(f"{e}; delete {d} to have the statistics recomputed") from None
        return out

    def _fit(self) -> dict[str, LayerStatistics]:
        if self.num_rows == 0:
            raise ValueError(f"log {self.path} has no committed rows; no statistics to fit")
        sums = [np.zeros((l.dim, l.dim), np.float64) for l in self.layers]
        for s in self.shards:
            sd = os.path.join(self.path, "shards", s.name)
            part = _writer.load_fisher(sd, s.rows, len(self.layers)) if s.rows else None
            if part is None:
                st = _writer.fisher_sums_from_rows(
                    s.grads, s.rows, self.layers, self.dtype, self.chunk_rows
                )
                part = [st.sum_outer[f"layer_{i}"] for i in range(len(self.layers))]
            for acc, p in zip(sums, part):
                acc += np.asarray(p, np.float64)
        out = {}
        for l, sm in zip(self.layers, sums):
            cov = covariance_from_sums(sm, self.num_rows)
            cov = 0.5 * (cov + cov.T)
            evals, evecs = fisher_eigh(cov)
            out[l.path] = LayerStatistics(cov, evals, evecs, self.num_rows)
        return out

    def _save(self, stats: dict[str, LayerStatistics]) -> bool:
        arrays = {}
        for i, l in enumerate(self.layers):
            st = stats[l.path]
            arrays[f"layer_{i}/covariance"] = st.covariance
            arrays[f"layer_{i}/eigenvalues"] = st.eigenvalues
            arrays[f"layer_{i}/eigenvectors"] = st.eigenvectors
        record = {"rows": self._stamp(), "layers": [l.path for l in self.layers]}
        try:
            return files.write_version(
                os.path.join(self.path, "statistics"),
                statistics_version(self._stamp()),
                arrays,
                "statistics.json",
                record,
            )
        except OSError as e:
            warnings.warn(
                f"statistics of {self.path} not cached ({e}); they are recomputed in memory",
                RuntimeWarning,
                stacklevel=3,
            )
            return False


def open_log(path: str) -> Log:
    """Open a log for reading: validates metadata, commit records and every committed chunk.

    Raises ``ValueError`` for a directory that is not a log and ``LogFormatError`` (a
    ``ValueError``) naming the file and the repair for a damaged one. Writes nothing.
    """
    path = os.path.abspath(path)
    meta = fmt.load_metadata(path)
    shards = []
    for name in files.shard_names(path):
        sd = os.path.join(path, "shards", name)
        rows = files.committed_rows(sd)
        if rows is None:
            continue  # a writer that is still creating its shard
        g = files.open_array(os.path.join(sd, "grads"), "log grads")
        i = files.open_array(os.path.join(sd, "ids"), "log ids")
        if g.shape[0] < rows or i.shape[0] < rows:
            raise fmt.LogFormatError(
                f"shard {sd}: arrays hold {g.shape[0]} / {i.shape[0]} rows but {rows} are "
                "committed (truncated log)"
            )
        if g.shape[1] != meta["dim"]:
            raise fmt.LogFormatError(
                f"shard {sd}: grads have {g.shape[1]} columns, metadata says {meta['dim']}"
            )
        if g.dtype.numpy_dtype.str != np.dtype(meta["storage_dtype"]).str:
            raise fmt.LogFormatError(
                f"shard {sd}: grads stored as {g.dtype.numpy_dtype}, metadata says "
                f"{meta['storage_dtype']}"
            )
        cr = meta["chunk_rows"]
        files.check_chunks_present(os.path.join(sd, "grads"), rows, cr, 2, "log grads")
        files.check_chunks_present(os.path.join(sd, "ids"), rows, cr, i.rank, "log ids")
        shards.append(Shard(name, rows, g, i))
    return Log(path, meta, shards)
