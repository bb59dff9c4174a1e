"""On-disk format of a gradient log: metadata, layer table, row packing, id encoding, errors.

A log is a plain directory that tensorstore and any zarr v2 reader can open (or the same keys
under a prefix of a tensorstore kvstore: S3, GCS, memory; see ``store_files.py``)::

    <log>/
      metadata.json                  what produced the log (see below); written once
      shards/<writer_id>/
        grads/                       zarr v2 array [capacity, D], rows = examples, all layers
                                     concatenated (layer l occupies columns
                                     [offset_l, offset_l + k_out_l * k_in_l), row-major
                                     [k_out, k_in] inside), chunks [chunk_rows, D], no compressor
        ids/                         zarr v2 array: int64 [capacity], or for string ids uint8
                                     [capacity, max_id_bytes] holding NUL-padded UTF-8
        committed.json               {"rows": n}: rows [0, n) are durable; later rows are garbage
        lock.json                    present while a writer holds the shard (owner, liveness)
        fisher/r<n>/                 sum_i g_i g_i^T over rows [0, n) (derived, one version per n)
      statistics/<version>/          fitted statistics of the whole log (derived, opt-in cache)
        statistics.json              {"rows": {writer_id: n}, "layers": [...]}: what it covers
        layer_<i>/covariance/        zarr [d, d] float64: F = mean g g^T (empirical Fisher)
        layer_<i>/eigenvalues/       zarr [d] float64, ascending
        layer_<i>/eigenvectors/      zarr [d, d] float64, columns

``metadata.json`` holds ``format`` ("jaxinf-log"), ``format_version``, ``library_version``,
``dtype`` (float64 / float32 / bfloat16 / float16), ``storage_dtype`` (the zarr dtype: bfloat16
is stored as its uint16 bit pattern ``<u2`` so that plain zarr readers open it; view the values
with ``ml_dtypes.bfloat16``), ``dim`` D, ``layers`` (path, k_out, k_in, offset, dim per layer),
``ids`` (kind "int" or "str", max_bytes), ``chunk_rows`` and ``projection``: the capture's
projection metadata (layer shapes, init, seed, model fingerprint), kept verbatim.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

FORMAT = "jaxinf-log"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
COMMIT_FILE = "committed.json"

# dtype name -> (zarr storage dtype, numpy dtype of the values)
DTYPES = {
    "float64": ("<f8", np.dtype(np.float64)),
    "float32": ("<f4", np.dtype(np.float32)),
    "float16": ("<f2", np.dtype(np.float16)),
    "bfloat16": ("<u2", np.dtype(ml_dtypes.bfloat16)),
}
WRITER_ID = re.compile(r"^[A-Za-z0-9_.-]+$")


class LogFormatError(ValueError):
    """A log directory is damaged or inconsistent; the message names the file and the repair."""


def library_version() -> str:
    import jaxinf

    return jaxinf.__version__


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


def json_roundtrip(obj: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(obj, sort_keys=True))
    except TypeError as e:
        raise TypeError(f"{what} must be JSON-serializable: {e}") from None


# ----------------------------------------------------------------------------- layer table


class LayerInfo(NamedTuple):
    """One logged layer: its columns ``[offset, offset + dim)`` of a row, shaped ``[k_out, k_in]``."""

    path: str
    k_out: int
    k_in: int
    offset: int
    dim: int


def layers_from_meta(meta: Mapping, where: str = "metadata") -> list[LayerInfo]:
    """The layer table of a log's metadata, checked: contiguous offsets, dims that multiply out."""
    table = meta.get("layers")
    if not isinstance(table, list) or not table:
        raise LogFormatError(f"{where}: 'layers' must be a non-empty list, got {table!r}")
    out, offset, seen = [], 0, set()
    for i, l in enumerate(table):
        keys = ("path", "k_out", "k_in", "offset", "dim")
        if not isinstance(l, Mapping) or any(k not in l for k in keys):
            raise LogFormatError(f"{where}: layers[{i}] lacks one of {keys}: {l!r}")
        info = LayerInfo(*(l[k] for k in keys))
        ints = (info.k_out, info.k_in, info.offset, info.dim)
        if not isinstance(info.path, str) or info.path in seen:
            raise LogFormatError(f"{where}: layers[{i}] has a bad or repeated path {info.path!r}")
        if (
            not all(isinstance(v, int) and not isinstance(v, bool) for v in ints)
            or min(info.k_out, info.k_in) < 1
        ):
            raise LogFormatError(f"{where}: layers[{i}] ({info.path!r}) has bad sizes {l!r}")
        if info.dim != info.k_out * info.k_in or info.offset != offset:
            raise LogFormatError(
                f"{where}: layers[{i}] ({info.path!r}) has offset {info.offset} and dim "
                f"{info.dim}; expected offset {offset} and dim k_out * k_in = "
                f"{info.k_out * info.k_in} (corrupted layer table)"
            )
        seen.add(info.path)
        out.append(info)
        offset += info.dim
    if offset != meta.get("dim"):
        raise LogFormatError(
            f"{where}: layer dims add up to {offset} but 'dim' is {meta.get('dim')!r} "
            "(corrupted layer table)"
        )
    return out


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


def nonfinite_layers(rows: np.ndarray, layers: Sequence[LayerInfo]) -> np.ndarray:
    """``[b, n_layers]`` bool: which layer's columns of each packed row hold a NaN or an Inf."""
    bad = ~np.isfinite(rows)
    return np.stack([bad[:, l.offset : l.offset + l.dim].any(1) for l in layers], 1)


def check_finite_rows(rows: np.ndarray, layers: Sequence[LayerInfo], ids, what: str) -> None:
    """Raise ``ValueError`` naming the first row (by id) and layer with a non-finite value."""
    bad = nonfinite_layers(np.asarray(rows), layers)
    if bad.any():
        r, j = np.argwhere(bad)[0]
        n = int(bad.any(1).sum())
        raise ValueError(
            f"{what}: row {int(r)} (id {ids[int(r)]!r}) has a NaN or Inf in layer "
            f"{layers[int(j)].path!r} ({n} such row(s) in this batch)"
        )


# ----------------------------------------------------------------------------- ids


def normalize_ids(
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


def ids_to_storage(arr: np.ndarray, kind: str, max_bytes: int) -> np.ndarray:
    # string ids: a [n, max_bytes] uint8 array of NUL-padded UTF-8 (portable across zarr readers)
    return arr if kind == "int" else arr.view(np.uint8).reshape(len(arr), max_bytes)


def ids_from_storage(arr: np.ndarray, kind: str) -> np.ndarray:
    if kind == "int":
        return np.asarray(arr, np.int64)
    raw = np.ascontiguousarray(arr, np.uint8).view(f"S{arr.shape[-1]}").reshape(arr.shape[0])
    return np.asarray([r.decode("utf-8") for r in raw], dtype=object)


# ----------------------------------------------------------------------------- metadata


def new_metadata(layers, projection, dtype, chunk_rows, id_kind, max_id_bytes) -> dict:
    dim = sum(l.dim for l in layers)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": library_version(),
        "dtype": dtype,
        "storage_dtype": DTYPES[dtype][0],
        "dim": dim,
        "layers": [l._asdict() for l in layers],
        "ids": {"kind": id_kind, "max_bytes": max_id_bytes},
        "chunk_rows": chunk_rows,
        "projection": projection,
    }


def check_metadata(meta: Any, mpath: str) -> dict:
    """Validate parsed ``metadata.json`` (format, version, keys, dtype, layer table)."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise LogFormatError(f"{mpath} is not jaxinf log metadata (format={got!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise LogFormatError(
            f"{mpath}: unsupported format_version {meta.get('format_version')!r} "
            f"(this library reads {FORMAT_VERSION})"
        )
    for key in ("dtype", "storage_dtype", "dim", "layers", "ids", "chunk_rows", "projection"):
        if key not in meta:
            raise LogFormatError(f"{mpath}: missing key {key!r} (truncated metadata)")
    if meta["dtype"] not in DTYPES or meta["storage_dtype"] != DTYPES[meta["dtype"]][0]:
        raise LogFormatError(
            f"{mpath}: unknown dtype {meta['dtype']!r} / storage {meta['storage_dtype']!r}"
        )
    ids = meta["ids"]
    if not isinstance(ids, dict) or ids.get("kind") not in ("int", "str"):
        raise LogFormatError(f"{mpath}: bad 'ids' entry {ids!r}")
    if not isinstance(meta["chunk_rows"], int) or meta["chunk_rows"] < 1:
        raise LogFormatError(f"{mpath}: bad chunk_rows {meta['chunk_rows']!r}")
    layers_from_meta(meta, mpath)
    return meta


def load_metadata(path) -> dict:
    """Read and check ``metadata.json`` of the log at a path, URL, kvstore spec or ``Loc``."""
    from jaxinf._src import store_files as files

    root = files.location(path)
    if root.st.local and not os.path.isdir(root.path):
        raise ValueError(f"{root} is not a directory (not a jaxinf log)")
    mloc = root / METADATA_FILE
    if not files.exists(mloc):
        raise ValueError(f"{root} is not a jaxinf log: missing {METADATA_FILE}")
    return check_metadata(files.read_json(mloc, "log metadata", LogFormatError), str(mloc))


def values(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values -> numpy array of the log dtype (bfloat16 is a view of the uint16 bits)."""
    return raw.view(DTYPES[dtype][1]) if dtype == "bfloat16" else raw


def storage(vals: np.ndarray, dtype: str) -> np.ndarray:
    return vals.view(np.uint16) if dtype == "bfloat16" else vals
