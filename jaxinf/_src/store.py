"""Gradient logs: sharded tensorstore (zarr v2) arrays of projected per-example gradients.

A log is a plain directory that tensorstore and any zarr v2 reader can open::

    <log>/
      metadata.json                  what produced the log (see below)
      shards/<writer_id>/
        grads/                       zarr v2 array [capacity, D], rows = examples, all layers
                                     concatenated (layer l occupies columns
                                     [offset_l, offset_l + k_out_l * k_in_l), row-major
                                     [k_out, k_in] inside), chunks [chunk_rows, D], no compressor
        ids/                         zarr v2 array: int64 [capacity], or for string ids uint8
                                     [capacity, max_id_bytes] holding NUL-padded UTF-8
        committed.json               {"rows": n}: rows [0, n) are durable; later rows are garbage
        fisher.json, fisher/layer_<i>/   sum_i g_i g_i^T over the committed rows (a cache)
      statistics/                    fitted statistics (written by ``Log.statistics()``)
        statistics.json              {"rows": {writer_id: n}, "layers": [...]}
        layer_<i>/covariance/        zarr [d, d] float64: F = mean g g^T (empirical Fisher)
        layer_<i>/eigenvalues/       zarr [d] float64, ascending
        layer_<i>/eigenvectors/      zarr [d, d] float64, columns

``metadata.json`` holds ``format`` ("jaxinf-log"), ``format_version``, ``library_version``,
``dtype`` (float64 / float32 / bfloat16 / float16), ``storage_dtype`` (the zarr dtype: bfloat16
is stored as its uint16 bit pattern ``<u2`` so that plain zarr readers open it; view the values
with ``ml_dtypes.bfloat16``), ``dim`` D, ``layers`` (path, k_out, k_in, offset, dim per layer),
``ids`` (kind "int" or "str", max_bytes), ``chunk_rows`` and ``projection``: the capture's
projection metadata (layer shapes, init, seed, model fingerprint), kept verbatim.

Durability: a writer buffers rows into whole chunks, writes them with tensorstore
asynchronously (a bounded number in flight, overlapping the caller's next batch), and advances
``committed.json`` (temp file + ``os.replace``, atomic) only after the writes of a contiguous
prefix of rows have completed. A killed writer leaves a log whose committed rows are all
intact; reopening the same ``writer_id`` resumes after them. Each process writes its own
shard (``writer_id``); a reader sees the committed rows of every shard.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import tensorstore as ts

from jaxinf._src.statistics import projected_covariance

FORMAT = "jaxinf-log"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"

# dtype name -> (zarr storage dtype, numpy dtype of the values)
_DTYPES = {
    "float64": ("<f8", np.dtype(np.float64)),
    "float32": ("<f4", np.dtype(np.float32)),
    "float16": ("<f2", np.dtype(np.float16)),
    "bfloat16": ("<u2", np.dtype(ml_dtypes.bfloat16)),
}
_WRITER_ID = re.compile(r"^[A-Za-z0-9_.-]+$")
_TARGET_CHUNK_BYTES = 8 << 20


def _library_version() -> str:
    import jaxinf

    return jaxinf.__version__


# ----------------------------------------------------------------------------- small file helpers


def _write_temp_json(d: str, obj: Any) -> str:
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        # tensorstore's file driver syncs the chunks it writes; sync the record that vouches
        # for them too, so a commit survives a machine crash and not only a process kill
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; logs are meant to be read by others
    return tmp


def _atomic_write_json(path: str, obj: Any) -> None:
    """Write JSON so that readers see the old or the new file, never a partial one."""
    d = os.path.dirname(path)
    tmp = _write_temp_json(d, obj)
    os.replace(tmp, path)


def _create_json_exclusive(path: str, obj: Any) -> bool:
    """Create ``path`` atomically unless it exists (several writers may race). True if created."""
    d = os.path.dirname(path)
    tmp = _write_temp_json(d, obj)
    try:
        os.link(tmp, path)  # fails if path exists: exactly one creator wins
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def _aligned_empty(shape, dtype) -> np.ndarray:
    """A zeroed host array on a 64-byte boundary (XLA's CPU client can alias such arrays)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(n + 64, np.uint8)
    off = (-raw.ctypes.data) % 64
    return raw[off : off + n].view(dtype).reshape(shape)


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{what}: missing file {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {path} is not valid JSON ({e})") from None


def diff_metadata(expected: Any, got: Any, prefix: str = "") -> list[str]:
    """Paths (dotted) at which two JSON-like values differ, e.g. ``["seed", "layers.Dense_0.k_in"]``."""
    if isinstance(expected, Mapping) and isinstance(got, Mapping):
        out = []
        for k in sorted(set(expected) | set(got), key=str):
            p = f"{prefix}.{k}" if prefix else str(k)
            if k not in expected:
                out.append(f"{p} (only in the query)")
            elif k not in got:
                out.append(f"{p} (only in the log)")
            else:
                out.extend(diff_metadata(expected[k], got[k], p))
        return out
    if isinstance(expected, (list, tuple)) and isinstance(got, (list, tuple)):
        if len(expected) != len(got):
            return [f"{prefix or '<root>'} (length {len(expected)} vs {len(got)})"]
        out = []
        for i, (a, b) in enumerate(zip(expected, got)):
            out.extend(diff_metadata(a, b, f"{prefix}[{i}]"))
        return out
    return [] if expected == got else [f"{prefix or '<root>'} ({expected!r} in the log vs {got!r})"]


def _json_roundtrip(obj: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(obj, sort_keys=True))
    except TypeError as e:
        raise TypeError(f"{what} must be JSON-serializable: {e}") from None


# ----------------------------------------------------------------------------- zarr arrays


def _zarr_spec(path: str) -> dict:
    return {"driver": "zarr", "kvstore": {"driver": "file", "path": path}}


def _create_array(path: str, shape, chunks, dtype: str) -> ts.TensorStore:
    spec = _zarr_spec(path)
    spec["metadata"] = {
        "shape": list(shape),
        "chunks": list(chunks),
        "dtype": dtype,
        "compressor": None,  # projected gradients do not compress; blosc would only cost CPU
        "fill_value": None,
    }
    return ts.open(spec, create=True, delete_existing=True).result()


def _open_array(path: str, what: str) -> ts.TensorStore:
    if not os.path.exists(os.path.join(path, ".zarray")):
        raise ValueError(f"{what}: missing zarr array {path} (truncated or foreign log directory)")
    return ts.open(_zarr_spec(path), open=True).result()


def _write_array(path: str, value: np.ndarray) -> None:
    a = _create_array(path, value.shape, value.shape or (1,), value.dtype.str)
    a.write(value).result()


def _read_array(path: str, what: str) -> np.ndarray:
    return _open_array(path, what).read().result()


# ----------------------------------------------------------------------------- layout / metadata


class LayerInfo(NamedTuple):
    """One logged layer: its columns ``[offset, offset + dim)`` of a row, shaped ``[k_out, k_in]``."""

    path: str
    k_out: int
    k_in: int
    offset: int
    dim: int


def _layers_from_meta(meta: Mapping) -> list[LayerInfo]:
    return [
        LayerInfo(l["path"], l["k_out"], l["k_in"], l["offset"], l["dim"]) for l in meta["layers"]
    ]


def layers_from_grads(grads: Mapping[str, Any]) -> list[LayerInfo]:
    """Layer table (sorted by path) of a ``{layer_path: [batch, k_out, k_in]}`` dict."""
    if not isinstance(grads, Mapping) or not grads:
        raise TypeError("grads must be a non-empty dict {layer_path: array [batch, k_out, k_in]}")
    out, offset = [], 0
    for path in sorted(grads):
        shape = tuple(np.shape(grads[path]))
        if len(shape) != 3:
            raise ValueError(f"grads[{path!r}] must have shape [batch, k_out, k_in], got {shape}")
        k_out, k_in = int(shape[1]), int(shape[2])
        out.append(LayerInfo(path, k_out, k_in, offset, k_out * k_in))
        offset += k_out * k_in
    return out


def check_grads(grads: Mapping[str, Any], layers: Sequence[LayerInfo], what: str) -> int:
    """Validate a grads dict against a layer table; return the batch size."""
    if not isinstance(grads, Mapping):
        raise TypeError(f"{what} must be a dict {{layer_path: array [batch, k_out, k_in]}}")
    want = {l.path for l in layers}
    if set(grads) != want:
        missing, extra = sorted(want - set(grads)), sorted(set(grads) - want)
        raise ValueError(
            f"{what}: layers differ from the log's: missing {missing}, unexpected {extra}"
        )
    n = None
    for l in layers:
        g = grads[l.path]
        shape = tuple(np.shape(g))
        if len(shape) != 3 or shape[1:] != (l.k_out, l.k_in):
            raise ValueError(
                f"{what}[{l.path!r}] has shape {shape}; the log has [batch, {l.k_out}, {l.k_in}]"
            )
        dt = np.asarray(g).dtype if not hasattr(g, "dtype") else g.dtype
        if not jnp.issubdtype(dt, jnp.floating):
            raise TypeError(f"{what}[{l.path!r}] must be floating point, got dtype {dt}")
        if n is None:
            n = shape[0]
        elif shape[0] != n:
            raise ValueError(
                f"{what}: layers have different batch sizes ({n} and {shape[0]} at {l.path!r})"
            )
    return int(n)


def check_projection_layers(projection: Mapping, layers: Sequence[LayerInfo], what: str) -> None:
    """Where the projection metadata lists layers with ``k_out`` / ``k_in``, the grads must match."""
    listed = projection.get("layers") if isinstance(projection, Mapping) else None
    if not isinstance(listed, Mapping) or not listed:
        return
    for l in layers:
        if l.path not in listed:
            raise ValueError(
                f"{what}: layer {l.path!r} is not in the projection metadata's layers "
                f"{sorted(listed)}"
            )
        info = listed[l.path]
        for key, got in (("k_out", l.k_out), ("k_in", l.k_in)):
            if isinstance(info, Mapping) and key in info and info[key] != got:
                raise ValueError(
                    f"{what}[{l.path!r}]: {key} is {got} but the projection metadata "
                    f"says {info[key]}"
                )


def pack_rows(grads: Mapping[str, Any], layers: Sequence[LayerInfo], dtype=None) -> jax.Array:
    """``{layer: [b, k_out, k_in]}`` -> ``[b, D]`` rows in the log's column order."""
    b = np.shape(grads[layers[0].path])[0]
    parts = [jnp.reshape(jnp.asarray(grads[l.path]), (b, l.dim)) for l in layers]
    rows = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    return rows if dtype is None else rows.astype(dtype)


def _normalize_ids(
    ids: Any, n: int, kind: str | None, max_bytes: int
) -> tuple[np.ndarray, list, str]:
    """Return (storage array, python keys, kind)."""
    ids = list(np.asarray(ids).tolist()) if not isinstance(ids, (list, tuple)) else list(ids)
    if len(ids) != n:
        raise ValueError(f"ids has {len(ids)} entries but the batch has {n} rows")
    if all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids):
        got = "int"
    elif all(isinstance(i, (str, bytes)) for i in ids):
        got = "str"
    else:
        raise TypeError("ids must be all integers or all strings")
    if kind is not None and got != kind and n > 0:
        raise TypeError(f"ids are {got}s but this log stores {kind} ids")
    kind = kind or got
    if kind == "int":
        keys = [int(i) for i in ids]
        return np.asarray(keys, np.int64), keys, kind
    enc = [i if isinstance(i, bytes) else i.encode("utf-8") for i in ids]
    for e in enc:
        if len(e) > max_bytes:
            raise ValueError(
                f"id {e[:40]!r}... is {len(e)} bytes; this log stores at most {max_bytes}"
            )
        if e.endswith(b"\0"):
            raise ValueError(
                f"id {e!r} ends with a NUL byte, which fixed-width storage would strip"
            )
    keys = [e.decode("utf-8") for e in enc]
    return np.asarray(enc, dtype=f"S{max_bytes}"), keys, kind


def _ids_to_storage(arr: np.ndarray, kind: str, max_bytes: int) -> np.ndarray:
    # string ids: a [n, max_bytes] uint8 array of NUL-padded UTF-8 (portable across zarr readers)
    return arr if kind == "int" else arr.view(np.uint8).reshape(len(arr), max_bytes)


def _ids_from_storage(arr: np.ndarray, kind: str) -> np.ndarray:
    if kind == "int":
        return np.asarray(arr, np.int64)
    raw = np.ascontiguousarray(arr, np.uint8).view(f"S{arr.shape[-1]}").reshape(arr.shape[0])
    return np.asarray([r.decode("utf-8") for r in raw], dtype=object)


def _new_metadata(layers, projection, dtype, chunk_rows, id_kind, max_id_bytes):
    dim = sum(l.dim for l in layers)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": _library_version(),
        "dtype": dtype,
        "storage_dtype": _DTYPES[dtype][0],
        "dim": dim,
        "layers": [l._asdict() for l in layers],
        "ids": {"kind": id_kind, "max_bytes": max_id_bytes},
        "chunk_rows": chunk_rows,
        "projection": projection,
    }


def _load_metadata(path: str) -> dict:
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a directory (not a jaxinf log)")
    mpath = os.path.join(path, METADATA_FILE)
    if not os.path.exists(mpath):
        raise ValueError(f"{path} is not a jaxinf log: missing {METADATA_FILE}")
    meta = _read_json(mpath, "log metadata")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(
            f"{mpath} is not jaxinf log metadata (format={meta.get('format') if isinstance(meta, dict) else None!r})"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{mpath}: unsupported format_version {meta.get('format_version')!r} "
            f"(this library reads {FORMAT_VERSION})"
        )
    for key in ("dtype", "storage_dtype", "dim", "layers", "ids", "chunk_rows", "projection"):
        if key not in meta:
            raise ValueError(f"{mpath}: missing key {key!r} (truncated metadata)")
    if meta["dtype"] not in _DTYPES:
        raise ValueError(f"{mpath}: unknown dtype {meta['dtype']!r}")
    return meta


def _values(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values -> numpy array of the log dtype (bfloat16 is a view of the uint16 bits)."""
    return raw.view(_DTYPES[dtype][1]) if dtype == "bfloat16" else raw


def _storage(values: np.ndarray, dtype: str) -> np.ndarray:
    return values.view(np.uint16) if dtype == "bfloat16" else values


def _shard_names(path: str) -> list[str]:
    d = os.path.join(path, "shards")
    if not os.path.isdir(d):
        return []
    return sorted(
        s for s in os.listdir(d) if _WRITER_ID.match(s) and os.path.isdir(os.path.join(d, s))
    )


def _committed_rows(shard_dir: str) -> int:
    p = os.path.join(shard_dir, "committed.json")
    if not os.path.exists(p):
        return 0
    rows = _read_json(p, "shard commit record").get("rows")
    if not isinstance(rows, int) or rows < 0:
        raise ValueError(f"{p}: invalid committed row count {rows!r}")
    return rows


def _check_chunks_present(array_dir: str, rows: int, chunk_rows: int, ndim: int, what: str) -> None:
    """Zarr reads missing chunks as fill values; a committed row must never be missing."""
    n_chunks = -(-rows // chunk_rows)
    suffix = ".0" if ndim == 2 else ""
    names = set(os.listdir(array_dir)) if os.path.isdir(array_dir) else set()
    for c in range(n_chunks):
        if f"{c}{suffix}" not in names:
            raise ValueError(
                f"{what}: chunk {c}{suffix} of {array_dir} is missing but rows up to "
                f"{rows} are committed (truncated log)"
            )


# ----------------------------------------------------------------------------- statistics helpers


_ACC = projected_covariance()


@functools.partial(jax.jit, static_argnames=("layers",))
def _acc_rows(state, rows, keep, layers):
    """Add ``sum g g^T`` of packed rows [b, D] (rows with keep=0 add nothing) per layer."""
    dt = jax.tree.leaves(state.sum_outer)[0].dtype
    x = rows.astype(dt) * keep.astype(dt)[:, None]
    return _ACC.update(
        state, {f"layer_{i}": x[:, l.offset : l.offset + l.dim] for i, l in enumerate(layers)}
    )


@functools.partial(jax.jit, static_argnames=("layers", "dtype"))
def _pack(grads, layers, dtype):
    return pack_rows(grads, layers, jnp.dtype(dtype))


def _acc_dtype(log_dtype: str):
    # accumulate float64 logs in float64 (when enabled), everything else in float32
    return jnp.float64 if (log_dtype == "float64" and jax.config.jax_enable_x64) else jnp.float32


def _fisher_sums_from_disk(grads_arr, rows: int, layers, log_dtype: str, chunk_rows: int):
    """Recompute sum g g^T per layer over rows [0, rows) of a shard."""
    dt = _acc_dtype(log_dtype)
    state = _ACC.init({f"layer_{i}": jnp.zeros((1, l.dim), dt) for i, l in enumerate(layers)})
    for a in range(0, rows, chunk_rows):
        b = min(rows, a + chunk_rows)
        block = _values(grads_arr[a:b].read().result(), log_dtype)
        state = _acc_rows(state, jnp.asarray(block), jnp.ones((b - a,), dt), tuple(layers))
    return state


def _save_fisher(shard_dir: str, state, rows: int, layers) -> None:
    for i in range(len(layers)):
        _write_array(
            os.path.join(shard_dir, "fisher", f"layer_{i}"),
            np.asarray(state.sum_outer[f"layer_{i}"], np.float64),
        )
    _atomic_write_json(os.path.join(shard_dir, "fisher.json"), {"rows": int(rows)})


def _load_fisher(shard_dir: str, layers) -> tuple[int, list[np.ndarray]] | None:
    p = os.path.join(shard_dir, "fisher.json")
    if not os.path.exists(p):
        return None
    rows = _read_json(p, "shard Fisher record")["rows"]
    sums = [
        _read_array(os.path.join(shard_dir, "fisher", f"layer_{i}"), "shard Fisher sums")
        for i in range(len(layers))
    ]
    return rows, sums


# ----------------------------------------------------------------------------- writer


class _Pending(NamedTuple):
    stop: int  # rows [.., stop) are durable once these futures complete
    futures: list


class WriteHandle:
    """Completion handle of ``write_async``: ``result()`` waits until the batch's rows are committed."""

    def __init__(self, writer: LogWriter, stop: int):
        self._writer, self._stop = writer, stop

    def done(self) -> bool:
        self._writer._reap(block=False)
        return self._writer.committed_rows >= self._stop

    def result(self) -> None:
        self._writer.flush(upto=self._stop)


class LogWriter:
    """Appends projected per-example gradients and their data ids to one shard of a log.

    Args:
      path: the log directory (created if needed).
      projection: the capture's JSON-able projection metadata (layers, init, seed, fingerprint);
        stored verbatim and required to match exactly when the log already exists.
      dtype: storage dtype: "float32" (default), "bfloat16", "float16" or "float64".
      writer_id: this writer's shard name, one per process (default: ``jax.process_index()``,
        so each host of a ``jax.distributed`` job writes its own shard). Reopening an existing
        shard resumes after its committed rows. A writer is not thread-safe.
      chunk_rows: rows per zarr chunk (default: about 8 MiB per chunk). Rows are written in whole
        chunks, so a chunk is the unit of durability.
      max_in_flight: chunk writes in flight before ``write_async`` waits for the oldest.
      on_duplicate: "error" (default): a data id already in the log (any shard, as of opening,
        or written by this writer) raises ``ValueError``; "skip": such rows are dropped silently,
        which makes re-running an interrupted loop append exactly the missing rows.
      max_id_bytes: fixed width of string ids (UTF-8 bytes).
      statistics: accumulate the empirical Fisher ``sum g g^T`` per layer while writing.

    Example:
      >>> import tempfile, numpy as np
      >>> projection = {"layers": {"Dense_0": {"k_in": 2, "k_out": 2}}}  # from the capture
      >>> path = tempfile.mkdtemp() + "/log"
      >>> with LogWriter(path, projection) as w:
      ...     for step in range(3):
      ...         grads = {"Dense_0": np.ones((4, 2, 2), np.float32)}
      ...         _ = w.write_async(grads, ids=range(4 * step, 4 * step + 4))
      >>> open_log(path).num_rows
      12
    """

    def __init__(
        self,
        path: str,
        projection: Mapping,
        *,
        dtype: str = "float32",
        writer_id: str | None = None,
        chunk_rows: int | None = None,
        max_in_flight: int = 4,
        on_duplicate: str = "error",
        max_id_bytes: int = 64,
        statistics: bool = True,
    ):
        if writer_id is None:
            writer_id = str(jax.process_index())
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if not isinstance(writer_id, str) or not _WRITER_ID.match(writer_id):
            raise ValueError(f"writer_id must match {_WRITER_ID.pattern}, got {writer_id!r}")
        if on_duplicate not in ("error", "skip"):
            raise ValueError(f"on_duplicate must be 'error' or 'skip', got {on_duplicate!r}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.path = os.path.abspath(path)
        self.projection = _json_roundtrip(projection, "projection")
        self.dtype, self.writer_id = dtype, writer_id
        self._chunk_rows_arg, self.max_in_flight = chunk_rows, max_in_flight
        self.on_duplicate, self._max_id_bytes = on_duplicate, max_id_bytes
        self._statistics = statistics
        self._pending: collections.deque[_Pending] = collections.deque()
        self._error: BaseException | None = None
        self._closed = False
        self.meta: dict | None = None
        self._ids_seen: set = set()
        if os.path.exists(os.path.join(self.path, METADATA_FILE)):
            self._attach(_load_metadata(self.path))
        elif (
            os.path.exists(self.path)
            and os.listdir(self.path)
            and not os.path.isdir(os.path.join(self.path, "shards"))
        ):
            raise ValueError(f"{self.path} exists, is not empty and is not a jaxinf log")

    # -- setup

    def _check_compatible(self, meta: dict) -> None:
        if meta["dtype"] != self.dtype:
            raise ValueError(
                f"dtype mismatch: the log at {self.path} stores {meta['dtype']}, "
                f"this writer was asked for {self.dtype}"
            )
        diffs = diff_metadata(meta["projection"], self.projection)
        if diffs:
            raise ValueError(
                f"projection metadata differs from the log at {self.path}: " + "; ".join(diffs)
            )
        if self._chunk_rows_arg is not None and self._chunk_rows_arg != meta["chunk_rows"]:
            raise ValueError(
                f"chunk_rows mismatch: the log uses {meta['chunk_rows']}, "
                f"this writer was asked for {self._chunk_rows_arg}"
            )

    def _attach(self, meta: dict) -> None:
        """Open (or create) this writer's shard of an existing log, resuming after committed rows."""
        self._check_compatible(meta)
        self.meta = meta
        self.layers = _layers_from_meta(meta)
        self.dim, self.chunk_rows = meta["dim"], meta["chunk_rows"]
        self._id_kind, self._max_id_bytes = meta["ids"]["kind"], meta["ids"]["max_bytes"]
        self._shard_dir = os.path.join(self.path, "shards", self.writer_id)
        # ids already committed anywhere in the log (other shards as of now)
        for name in _shard_names(self.path):
            if name != self.writer_id:
                sd = os.path.join(self.path, "shards", name)
                n = _committed_rows(sd)
                if n:
                    ids = _ids_from_storage(
                        _open_array(os.path.join(sd, "ids"), "log ids")[:n].read().result(),
                        self._id_kind,
                    )
                    self._ids_seen.update(ids.tolist())
        gdir, idir = os.path.join(self._shard_dir, "grads"), os.path.join(self._shard_dir, "ids")
        if os.path.exists(os.path.join(gdir, ".zarray")):
            self._grads = _open_array(gdir, "shard grads")
            self._ids = _open_array(idir, "shard ids")
            self.committed_rows = _committed_rows(self._shard_dir)
            if (
                self._grads.shape[0] < self.committed_rows
                or self._ids.shape[0] < self.committed_rows
            ):
                raise ValueError(
                    f"shard {self._shard_dir}: arrays shorter than the committed "
                    f"{self.committed_rows} rows (truncated log)"
                )
            _check_chunks_present(gdir, self.committed_rows, self.chunk_rows, 2, "shard grads")
            if self.committed_rows:
                ids = _ids_from_storage(
                    self._ids[: self.committed_rows].read().result(), self._id_kind
                )
                self._ids_seen.update(ids.tolist())
        else:
            os.makedirs(self._shard_dir, exist_ok=True)
            cap = self.chunk_rows
            self._grads = _create_array(
                gdir, (cap, self.dim), (self.chunk_rows, self.dim), meta["storage_dtype"]
            )
            if self._id_kind == "int":
                self._ids = _create_array(idir, (cap,), (self.chunk_rows,), "<i8")
            else:
                self._ids = _create_array(
                    idir, (cap, self._max_id_bytes), (self.chunk_rows, self._max_id_bytes), "|u1"
                )
            self.committed_rows = 0
            _atomic_write_json(os.path.join(self._shard_dir, "committed.json"), {"rows": 0})
        self._next_row = self.committed_rows  # first row of the chunk being filled
        # A ring of reused chunk buffers: batches are copied into the current one, a full one is
        # handed to tensorstore, and a buffer is refilled only once tensorstore has copied it
        # out. Fresh multi-MB arrays per chunk cost more in page faults than the copy itself.
        n_slots = self.max_in_flight + 1
        storage = np.dtype(meta["storage_dtype"])
        self._ring_rows = [
            _aligned_empty((self.chunk_rows, self.dim), storage) for _ in range(n_slots)
        ]
        id_shape = (
            (self.chunk_rows,) if self._id_kind == "int" else (self.chunk_rows, self._max_id_bytes)
        )
        id_dtype = np.int64 if self._id_kind == "int" else np.uint8
        self._ring_ids = [np.zeros(id_shape, id_dtype) for _ in range(n_slots)]
        self._ring_busy: list = [None] * n_slots  # futures: tensorstore has copied the buffer
        self._slot = 0
        self._fill = 0  # rows in the current buffer
        self._acc_state = None
        if self._statistics:
            dt = _acc_dtype(self.dtype)
            cached = _load_fisher(self._shard_dir, self.layers)
            if cached is not None and cached[0] == self.committed_rows:
                self._acc_state = _ACC.init(
                    {f"layer_{i}": jnp.zeros((1, l.dim), dt) for i, l in enumerate(self.layers)}
                )
                self._acc_state = self._acc_state._replace(
                    sum_outer={f"layer_{i}": jnp.asarray(s, dt) for i, s in enumerate(cached[1])},
                    count=jnp.asarray(cached[0], jnp.int32),
                )
            else:  # killed before the cache was saved: recompute from the committed rows
                self._acc_state = _fisher_sums_from_disk(
                    self._grads, self.committed_rows, self.layers, self.dtype, self.chunk_rows
                )

    def _create(self, grads: Mapping, ids_kind: str) -> None:
        layers = layers_from_grads(grads)
        check_projection_layers(self.projection, layers, "grads")
        dim = sum(l.dim for l in layers)
        chunk_rows = self._chunk_rows_arg or max(
            1, _TARGET_CHUNK_BYTES // (dim * _DTYPES[self.dtype][1].itemsize)
        )
        meta = _new_metadata(
            layers, self.projection, self.dtype, chunk_rows, ids_kind, self._max_id_bytes
        )
        os.makedirs(os.path.join(self.path, "shards"), exist_ok=True)
        _create_json_exclusive(os.path.join(self.path, METADATA_FILE), meta)
        # another writer may have won the race: attach to whatever is on disk, after checking it
        self._attach(_load_metadata(self.path))

    # -- writing

    @property
    def num_rows(self) -> int:
        """Rows accepted by this writer's shard (committed + in flight + buffered)."""
        return self._next_row + self._fill if self.meta else 0

    def __contains__(self, data_id) -> bool:
        return data_id in self._ids_seen

    def _raise_if_failed(self):
        if self._error is not None:
            raise RuntimeError(
                f"log writer for {self._shard_dir} failed earlier: {self._error!r}"
            ) from self._error
        if self._closed:
            raise ValueError(f"log writer for {self.path} is closed")

    def write(self, grads: Mapping[str, Any], ids: Sequence) -> None:
        """Append a batch and wait until everything written so far is committed."""
        self.write_async(grads, ids)
        self.flush()

    def write_async(self, grads: Mapping[str, Any], ids: Sequence) -> WriteHandle:
        """Append a batch ``{layer: [b, k_out, k_in]}`` with ``b`` data ids; returns at once.

        Full chunks are handed to tensorstore in the background while the caller computes the
        next batch; at most ``max_in_flight`` chunk writes are outstanding. Errors of earlier
        writes are raised here (or by ``flush`` / ``close``).
        """
        self._raise_if_failed()
        if self.meta is None:
            # validate the first batch fully before its shapes become the log's metadata
            n = check_grads(grads, layers_from_grads(grads), "grads")
            kind = _normalize_ids(ids, n, None, self._max_id_bytes)[2]
            self._create(grads, kind)
        n = check_grads(grads, self.layers, "grads")
        id_arr, keys, _ = _normalize_ids(ids, n, self._id_kind, self._max_id_bytes)
        if len(set(keys)) != len(keys):
            dup = [k for k, c in collections.Counter(keys).items() if c > 1][:5]
            raise ValueError(f"duplicate data ids within one batch: {dup}")
        keep = np.asarray([k not in self._ids_seen for k in keys], bool)
        if not keep.all() and self.on_duplicate == "error":
            dup = [k for k, m in zip(keys, keep) if not m][:5]
            raise ValueError(
                f"data ids already in the log {self.path}: {dup} "
                "(use on_duplicate='skip' to resume an interrupted run)"
            )
        try:
            if not keep.any():
                return WriteHandle(self, self.committed_rows)
            rows = _pack(dict(grads), tuple(self.layers), self.dtype)
            if self._acc_state is not None:
                self._acc_state = _acc_rows(self._acc_state, rows, keep, tuple(self.layers))
            host = np.asarray(rows)  # waits for this batch's compute only
            if not keep.all():
                host, id_arr = host[keep], id_arr[keep]
                keys = [k for k, m in zip(keys, keep) if m]
            self._ids_seen.update(keys)
            self._append(
                _storage(host, self.dtype),
                _ids_to_storage(id_arr, self._id_kind, self._max_id_bytes),
            )
            self._reap(block=False)
        except BaseException as e:
            self._error = e
            raise
        return WriteHandle(self, self.num_rows)

    def _append(self, rows: np.ndarray, ids: np.ndarray) -> None:
        """Copy rows into the ring; hand each chunk to tensorstore as soon as it is full."""
        i = 0
        while i < len(rows):
            # the current chunk ends at the next chunk boundary (the first one may be partial
            # after a resume or a flush)
            target = self.chunk_rows - self._next_row % self.chunk_rows
            take = min(target - self._fill, len(rows) - i)
            self._ring_rows[self._slot][self._fill : self._fill + take] = rows[i : i + take]
            self._ring_ids[self._slot][self._fill : self._fill + take] = ids[i : i + take]
            self._fill += take
            i += take
            if self._fill == target:
                self._issue()

    def _issue(self) -> None:
        """Hand the current buffer's rows to tensorstore and move to the next ring slot."""
        count = self._fill
        start, stop = self._next_row, self._next_row + count
        if stop > self._grads.shape[0]:
            cap = max(stop, 2 * self._grads.shape[0])
            cap = -(-cap // self.chunk_rows) * self.chunk_rows
            self._grads = self._grads.resize(exclusive_max=[cap, None], expand_only=True).result()
            self._ids = self._ids.resize(
                exclusive_max=[cap] + [None] * (self._ids.rank - 1), expand_only=True
            ).result()
        f1 = self._grads[start:stop].write(self._ring_rows[self._slot][:count])
        f2 = self._ids[start:stop].write(self._ring_ids[self._slot][:count])
        self._pending.append(_Pending(stop, [f1.commit, f2.commit]))
        self._ring_busy[self._slot] = (f1.copy, f2.copy)
        self._next_row, self._fill = stop, 0
        self._slot = (self._slot + 1) % len(self._ring_rows)
        # bounded in flight: wait for the oldest writes
        while len(self._pending) > self.max_in_flight:
            self._reap(block=True, one=True)
        if self._ring_busy[self._slot] is not None:  # tensorstore may still be reading it
            for f in self._ring_busy[self._slot]:
                f.result()
            self._ring_busy[self._slot] = None

    def _reap(self, block: bool, one: bool = False) -> None:
        """Retire completed writes in order and advance the committed row count."""
        advanced = False
        try:
            while self._pending:
                p = self._pending[0]
                if not block and not all(f.done() for f in p.futures):
                    break
                for f in p.futures:
                    f.result()  # raises the write's error here, in the caller's thread
                self._pending.popleft()
                self.committed_rows = p.stop
                advanced = True
                if one:
                    break
        except BaseException as e:
            self._error = e
            raise
        finally:
            if advanced:
                _atomic_write_json(
                    os.path.join(self._shard_dir, "committed.json"), {"rows": self.committed_rows}
                )

    def flush(self, upto: int | None = None) -> None:
        """Write buffered rows (a partial last chunk too) and wait until they are committed."""
        self._raise_if_failed()
        if self.meta is None:
            return
        try:
            if self._fill and (upto is None or upto > self._next_row):
                self._issue()
        except BaseException as e:
            self._error = e
            raise
        while self._pending and (upto is None or self.committed_rows < upto):
            self._reap(block=True, one=True)

    def close(self) -> None:
        """Flush, save the Fisher sums of the shard and trim its arrays to the committed rows."""
        if self._closed:
            return
        if self.meta is not None and self._error is None:
            self.flush()
            if self._acc_state is not None:
                _save_fisher(self._shard_dir, self._acc_state, self.committed_rows, self.layers)
            cap = -(-max(self.committed_rows, 1) // self.chunk_rows) * self.chunk_rows
            if cap < self._grads.shape[0]:
                self._grads = self._grads.resize(
                    exclusive_max=[cap, None], shrink_only=True
                ).result()
                self._ids = self._ids.resize(
                    exclusive_max=[cap] + [None] * (self._ids.rank - 1), shrink_only=True
                ).result()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:  # keep what is committed; do not mask the original error
            try:
                self.close()
            except BaseException:
                pass
        return False


# ----------------------------------------------------------------------------- reader


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


class Log:
    """A read-only view of a log: metadata, committed rows of every shard, statistics."""

    def __init__(self, path: str, meta: dict, shards: list[Shard]):
        self.path, self.meta, self.shards = path, meta, shards
        self.layers = _layers_from_meta(meta)
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
        parts = [
            _ids_from_storage(s.ids[: s.rows].read().result(), self.meta["ids"]["kind"])
            for s in self.shards
        ]
        if not parts:
            return np.zeros((0,), np.int64 if self.meta["ids"]["kind"] == "int" else object)
        return np.concatenate(parts)

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
            rows = np.concatenate(rows) if rows else np.zeros((0, self.dim), _DTYPES[self.dtype][1])
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
            rows = _values(s.grads[start:stop].read().result(), self.dtype)
            ids = _ids_from_storage(s.ids[start:stop].read().result(), self.meta["ids"]["kind"])
        if not as_layers:
            return rows, ids
        return {
            l.path: rows[:, l.offset : l.offset + l.dim].reshape(-1, l.k_out, l.k_in)
            for l in self.layers
        }, ids

    def statistics(self, refresh: bool = False) -> dict[str, LayerStatistics]:
        """Empirical Fisher of the projected gradients per layer, with its eigendecomposition.

        Sums the shards' cached ``sum g g^T`` (recomputing any that are stale from the logged
        rows), divides by the row count and diagonalizes in float64. The result is saved under
        ``statistics/`` and reused while the shards' committed rows are unchanged.
        """
        if self._stats is not None and not refresh:
            return self._stats
        self._stats = self._statistics(refresh)
        return self._stats

    def _statistics(self, refresh: bool) -> dict[str, LayerStatistics]:
        stamp = {s.name: s.rows for s in self.shards}
        sdir = os.path.join(self.path, "statistics")
        spath = os.path.join(sdir, "statistics.json")
        if not refresh and os.path.exists(spath):
            rec = _read_json(spath, "log statistics")
            if rec.get("rows") == stamp:
                out = {}
                for i, l in enumerate(self.layers):
                    ld = os.path.join(sdir, f"layer_{i}")
                    out[l.path] = LayerStatistics(
                        _read_array(os.path.join(ld, "covariance"), "statistics"),
                        _read_array(os.path.join(ld, "eigenvalues"), "statistics"),
                        _read_array(os.path.join(ld, "eigenvectors"), "statistics"),
                        self.num_rows,
                    )
                return out
        if self.num_rows == 0:
            raise ValueError(f"log {self.path} has no committed rows; no statistics to fit")
        sums = [np.zeros((l.dim, l.dim), np.float64) for l in self.layers]
        for s in self.shards:
            sd = os.path.join(self.path, "shards", s.name)
            cached = _load_fisher(sd, self.layers)
            if cached is None or cached[0] != s.rows:
                st = _fisher_sums_from_disk(
                    s.grads, s.rows, self.layers, self.dtype, self.chunk_rows
                )
                part = [
                    np.asarray(st.sum_outer[f"layer_{i}"], np.float64)
                    for i in range(len(self.layers))
                ]
            else:
                part = cached[1]
            for acc, p in zip(sums, part):
                acc += p
        out = {}
        for l, sm in zip(self.layers, sums):
            cov = sm / self.num_rows
            cov = 0.5 * (cov + cov.T)
            evals, evecs = np.linalg.eigh(cov)
            out[l.path] = LayerStatistics(cov, evals, evecs, self.num_rows)
        try:
            for i, l in enumerate(self.layers):
                ld = os.path.join(sdir, f"layer_{i}")
                _write_array(os.path.join(ld, "covariance"), out[l.path].covariance)
                _write_array(os.path.join(ld, "eigenvalues"), out[l.path].eigenvalues)
                _write_array(os.path.join(ld, "eigenvectors"), out[l.path].eigenvectors)
            _atomic_write_json(spath, {"rows": stamp, "layers": [l.path for l in self.layers]})
        except OSError:
            pass  # a read-only log still answers queries; the statistics just are not cached
        return out


def open_log(path: str) -> Log:
    """Open a log for reading: validates metadata and that every committed chunk exists.

    Raises ``ValueError`` naming the file for a foreign or truncated directory.
    """
    path = os.path.abspath(path)
    meta = _load_metadata(path)
    shards = []
    for name in _shard_names(path):
        sd = os.path.join(path, "shards", name)
        if not os.path.exists(os.path.join(sd, "committed.json")):
            continue  # a writer that has not committed anything yet
        rows = _committed_rows(sd)
        g = _open_array(os.path.join(sd, "grads"), "log grads")
        i = _open_array(os.path.join(sd, "ids"), "log ids")
        if g.shape[0] < rows or i.shape[0] < rows:
            raise ValueError(
                f"shard {sd}: arrays hold {g.shape[0]} rows but {rows} are committed "
                "(truncated log)"
            )
        if g.shape[1] != meta["dim"]:
            raise ValueError(
                f"shard {sd}: grads have {g.shape[1]} columns, metadata says {meta['dim']}"
            )
        if g.dtype.numpy_dtype.str != np.dtype(meta["storage_dtype"]).str:
            raise ValueError(
                f"shard {sd}: grads stored as {g.dtype.numpy_dtype}, metadata says "
                f"{meta['storage_dtype']}"
            )
        _check_chunks_present(os.path.join(sd, "grads"), rows, meta["chunk_rows"], 2, "log grads")
        _check_chunks_present(os.path.join(sd, "ids"), rows, meta["chunk_rows"], i.rank, "log ids")
        shards.append(Shard(name, rows, g, i))
    return Log(path, meta, shards)
