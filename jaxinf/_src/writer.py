"""The log writer: appends rows to one locked shard under a crash-safe commit protocol.

Commit protocol of a shard (every step is one atomic single-key write; a crash between any two
leaves a shard that opens and resumes with every committed row exactly once):

1. take ``lock.json`` (exclusive create; a dead owner's lock is reported and taken over);
2. with the shard's first rows: create ``grads/.zarray`` then ``ids/.zarray`` if absent (never
   over an existing array), then ``committed.json`` ``{"rows": 0}`` if absent;
3. to append rows ``[n, m)``: grow ``grads`` if it is shorter than ``m``, then ``ids`` (each on
   its own: a crash between leaves both at least ``n`` long), write their chunks;
4. when the chunk writes of a contiguous prefix ``[0, m)`` have completed, under the log's
   ``commit.lock`` (held for this step only): check the rows against the ids other shards
   committed since last seen, then replace ``committed.json`` with ``{"rows": m}`` (or the
   first duplicate's row): rows past the record are ignored and overwritten;
5. at ``close()``, only if rows were added: the Fisher sums as a new version ``fisher/r<m>``
   (one directory rename), the arrays trimmed to whole chunks, then the lock removed.
"""

from __future__ import annotations

import collections
import functools
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxinf._src import store_files as files
from jaxinf._src import store_format as fmt
from jaxinf._src.statistics import mirror_upper, projected_covariance
from jaxinf._src.store_index import IdIndex, id_keys

_TARGET_CHUNK_BYTES = 8 << 20
_ACC = projected_covariance()


def _before_write(step: str) -> None:
    """Called before every write of the commit protocol (tests inject crashes here)."""


def default_writer_id() -> str:
    """A shard name unique to this job and process: ``<UTC time>-<random>-p<process index>``.

    Names sort by start time, so the shards of successive jobs keep their order in the log.
    """
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return f"{stamp}-{uuid.uuid4().hex[:8]}-p{jax.process_index()}"


# ----------------------------------------------------------------------------- Fisher sums


# the state is donated: without it every call writes each [D, D] sum into fresh memory,
# which costs more than the rank-b update itself
@functools.partial(jax.jit, static_argnames=("layers",), donate_argnames=("state",))
def _acc_rows(state, rows, keep, layers):
    """Add ``sum g g^T`` of packed rows [b, D] (rows with keep=0 add nothing) per layer.

    Only the upper triangle of each sum is kept current (``add_outer(upper=True)``); read the
    sums through ``_full_sums``.
    """
    dt = jax.tree.leaves(state.sum_outer)[0].dtype
    x = rows.astype(dt) * keep.astype(dt)[:, None]
    return _ACC.update(
        state, {f"layer_{i}": x[:, l.offset : l.offset + l.dim] for i, l in enumerate(layers)}
    )


@jax.jit
def _full_sums(sum_outer):
    """The symmetric sums of a state built by ``_acc_rows`` (upper triangle mirrored)."""
    return jax.tree.map(mirror_upper, sum_outer)


@functools.partial(jax.jit, static_argnames=("layers", "dtype"))
def _pack(grads, layers, dtype):
    """Packed rows cast to the storage dtype, and [b, n_layers] flags: non-finite input, and
    non-finite after the cast (an overflow when the input was finite)."""
    rows = fmt.pack_rows(grads, layers)
    cast = rows.astype(jnp.dtype(dtype))

    def per_layer(x):
        bad = ~jnp.isfinite(x)
        return jnp.stack([bad[:, l.offset : l.offset + l.dim].any(1) for l in layers], 1)

    return cast, per_layer(rows), per_layer(cast)


def acc_dtype(log_dtype: str):
    # accumulate float64 logs in float64 (when enabled), everything else in float32
    return jnp.float64 if (log_dtype == "float64" and jax.config.jax_enable_x64) else jnp.float32


def fisher_sums_from_rows(grads_arr, rows: int, layers, log_dtype: str, chunk_rows: int):
    """Recompute ``sum g g^T`` per layer over rows [0, rows) of a shard (in memory).

    The returned state's sums are whole symmetric matrices.
    """
    dt = acc_dtype(log_dtype)
    state = _ACC.init({f"layer_{i}": jnp.zeros((1, l.dim), dt) for i, l in enumerate(layers)})
    for a in range(0, rows, chunk_rows):
        b = min(rows, a + chunk_rows)
        block = fmt.values(grads_arr[a:b].read().result(), log_dtype)
        state = _acc_rows(state, jnp.asarray(block), jnp.ones((b - a,), dt), tuple(layers))
    return state._replace(sum_outer=_full_sums(state.sum_outer))


def save_fisher(shard_dir, sums: Sequence, rows: int) -> bool:
    """Write ``fisher/r<rows>`` (one array per layer) as a new version; keep the previous one.

    ``shard_dir`` is the shard's path or ``Loc`` (see ``store_files.location``).
    """
    parent = files.location(shard_dir) / "fisher"
    arrays = {f"layer_{i}": np.asarray(s, np.float64) for i, s in enumerate(sums)}
    made = files.write_version(parent, f"r{rows}", arrays, "fisher.json", {"rows": int(rows)})
    olds = sorted(
        (
            int(n[1:-1])
            for n in parent.st.list(parent.key)
            if n[:1] == "r" and n.endswith("/") and n[1:-1].isdigit()
        ),
        reverse=True,
    )
    for old in olds[2:]:
        files.remove_version(parent / f"r{old}", "fisher.json")
    return made


def load_fisher(shard_dir, rows: int, n_layers: int) -> list[np.ndarray] | None:
    """The Fisher sums version of exactly ``rows`` rows, or None (raises if one is damaged)."""
    d = files.location(shard_dir) / "fisher" / f"r{rows}"
    if not files.has_version(d, "fisher.json"):
        return None
    rec = files.read_json(d / "fisher.json", "shard Fisher sums", fmt.LogFormatError)
    if rec.get("rows") != rows:
        raise fmt.LogFormatError(f"{d}/fisher.json covers {rec.get('rows')!r} rows, not {rows}")
    try:
        return [files.read_array(d / f"layer_{i}", "shard Fisher sums") for i in range(n_layers)]
    except fmt.LogFormatError as e:
        raise fmt.LogFormatError(f"{e}; delete {d} to have the sums recomputed") from None


# ----------------------------------------------------------------------------- writer


class _Pending(NamedTuple):
    stop: int  # rows [.., stop) are durable once these futures complete
    futures: list


class WriteHandle:
    """Completion handle of ``write_async``: ``result()`` waits until the batch's rows are committed."""

    def __init__(self, writer: LogWriter, stop: int):
        self._writer, self._stop, self._drops_seen = writer, stop, len(writer._drops)

    def _end(self) -> int:
        # rows dropped at a commit (ids that a concurrent writer committed first) move the
        # rows after them down; each drop lists the row numbers it removed
        w = self._writer
        for dropped in w._drops[self._drops_seen :]:
            self._stop -= int(np.searchsorted(dropped, self._stop))
        self._drops_seen = len(w._drops)
        return self._stop

    def done(self) -> bool:
        self._writer._reap(block=False)
        return self._writer.committed_rows >= self._end()

    def result(self) -> None:
        self._writer.flush(upto=self._end())


class LogWriter:
    """Appends projected per-example gradients and their data ids to one locked shard of a log.

    Args:
      path: where the log lives (created if needed): a directory, a tensorstore kvstore URL
        (``"memory://log/"``, ``"s3://bucket/log/"``, ``"gs://bucket/log/"``) or a kvstore
        spec dict (``{"driver": "s3", "bucket": ..., "path": ..., "endpoint": ...}``). Every
        guarantee below holds on a kvstore too (see ``docs/format.md``).
      projection: the capture's JSON-able projection metadata (layers, init, seed, fingerprint);
        stored verbatim and required to match exactly when the log already exists.
      dtype: storage dtype: "float32" (default), "bfloat16", "float16" or "float64".
      writer_id: this writer's shard name. The default is unique to the job and process
        (``<UTC time>-<random>-p<process index>``), so jobs never share a shard; pass a fixed
        id to resume a shard after its committed rows. A shard is locked by its writer:
        a second writer with the same id raises ``LogLockedError`` here. Not thread-safe.
      chunk_rows: rows per zarr chunk (default: about 8 MiB per chunk). Rows are written in whole
        chunks, so a chunk is the unit of durability.
      max_in_flight: chunk writes in flight before ``write_async`` waits for the oldest.
      on_duplicate: "error" (default): a data id already in the log (any shard, or written by
        this writer) raises ``ValueError``; "skip": such rows are dropped, which makes
        re-running an interrupted loop append exactly the missing rows. Writers running at the
        same time are checked against each other at each commit: of two rows with one id, the
        one committed first stays; the other raises ``ValueError`` from a later
        ``write_async``, ``flush`` or ``close`` (rows before it stay committed), or is dropped.
      on_nonfinite: "error" (default): a NaN or Inf raises ``ValueError`` naming the row's id
        and the layer; "skip": such rows are dropped. A cast to float16/bfloat16 that overflows
        is always an error.
      max_id_bytes: fixed width of string ids (UTF-8 bytes).
      statistics: accumulate the empirical Fisher ``sum g g^T`` per layer while writing.

    Example:
      >>> import tempfile, numpy as np
      >>> from jaxinf import open_log
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
        on_nonfinite: str = "error",
        max_id_bytes: int = 64,
        statistics: bool = True,
    ):
        if writer_id is None:
            writer_id = default_writer_id()
        if dtype not in fmt.DTYPES:
            raise ValueError(f"dtype must be one of {sorted(fmt.DTYPES)}, got {dtype!r}")
        if not isinstance(writer_id, str) or not fmt.WRITER_ID.match(writer_id):
            raise ValueError(f"writer_id must match {fmt.WRITER_ID.pattern}, got {writer_id!r}")
        if on_duplicate not in ("error", "skip"):
            raise ValueError(f"on_duplicate must be 'error' or 'skip', got {on_duplicate!r}")
        if on_nonfinite not in ("error", "skip"):
            raise ValueError(f"on_nonfinite must be 'error' or 'skip', got {on_nonfinite!r}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self._root = files.location(path)
        self.path = str(self._root)
        self.projection = fmt.json_roundtrip(projection, "projection")
        self.dtype, self.writer_id = dtype, writer_id
        self._chunk_rows_arg, self.max_in_flight = chunk_rows, max_in_flight
        self.on_duplicate, self.on_nonfinite = on_duplicate, on_nonfinite
        self._max_id_bytes = max_id_bytes
        self._statistics = statistics
        self._pending: collections.deque[_Pending] = collections.deque()
        self._error: BaseException | None = None
        self._closed = False
        self.meta: dict | None = None
        self.committed_rows = 0
        self._drops: list[np.ndarray] = []  # row numbers removed by each drop (see _commit)
        self._shard_dir = self._root / "shards" / self.writer_id
        self._commit_gen = None  # the commit record's storage generation (kvstore only)
        has_meta = files.exists(self._root / fmt.METADATA_FILE)
        names = self._root.st.list(self._root.key)
        if not has_meta and names and "shards/" not in names:
            raise ValueError(f"{self.path} exists, is not empty and is not a jaxinf log")
        files.makedirs(self._shard_dir)
        self._lock = files.ShardLock(self._shard_dir)
        self._lock.acquire()
        # a writer dropped without close() frees its shard (its uncommitted rows are lost)
        self._release = weakref.finalize(self, self._lock.release)
        try:
            if has_meta:
                self._attach(fmt.load_metadata(self._root))
        except BaseException:
            self._release()
            raise

    # -- setup

    def _check_compatible(self, meta: dict) -> None:
        if meta["dtype"] != self.dtype:
            raise ValueError(
                f"dtype mismatch: the log at {self.path} stores {meta['dtype']}, "
                f"this writer was asked for {self.dtype}"
            )
        diffs = fmt.diff_metadata(meta["projection"], self.projection)
        if diffs:
            raise ValueError(
                f"projection metadata differs from the log at {self.path}: " + "; ".join(diffs)
            )
        if self._chunk_rows_arg is not None and self._chunk_rows_arg != meta["chunk_rows"]:
            raise ValueError(
                f"chunk_rows mismatch: the log uses {meta['chunk_rows']}, "
                f"this writer was asked for {self._chunk_rows_arg}"
            )

    def _open_or_create(self, name: str, shape, chunks, dtype: str, rows: int | None):
        d = self._shard_dir / name
        if files.exists(d / ".zarray"):
            arr = files.open_array(d, f"shard {name}")
        elif rows:
            raise fmt.LogFormatError(
                f"shard {self._shard_dir}: {rows} rows are committed but {d}/.zarray is missing; "
                f"restore it from a backup, or delete {self._shard_dir} to drop the shard "
                "(the writer never recreates an array over committed rows)"
            )
        else:
            _before_write(f"create {name}")
            arr = files.create_array(d, shape, chunks, dtype)
        if tuple(arr.shape[1:]) != tuple(shape[1:]) or arr.dtype.numpy_dtype.str != (
            np.dtype(dtype).str
        ):
            raise fmt.LogFormatError(
                f"shard {d}: array is {arr.dtype.numpy_dtype}{list(arr.shape)}, the log "
                f"metadata says {dtype} [rows, {', '.join(map(str, shape[1:]))}]"
            )
        if arr.shape[0] < (rows or 0):
            raise fmt.LogFormatError(
                f"shard {d}: array holds {arr.shape[0]} rows but {rows} are committed "
                "(truncated log)"
            )
        return arr

    def _attach(self, meta: dict) -> None:
        """Open (or create) this writer's shard of an existing log, resuming after committed rows."""
        self._check_compatible(meta)
        self.meta = meta
        self.layers = fmt.layers_from_meta(meta, str(self._root / fmt.METADATA_FILE))
        self.dim, self.chunk_rows = meta["dim"], meta["chunk_rows"]
        self._id_kind, self._max_id_bytes = meta["ids"]["kind"], meta["ids"]["max_bytes"]
        rows = files.committed_rows(self._shard_dir)
        cr = self.chunk_rows
        # a shard that has no commit record yet is created with its first rows (protocol step
        # 2), so a writer that adds nothing leaves nothing behind
        self._grads = self._ids = None
        if rows is not None:
            self._open_shard(rows)
            self._commit_gen = files.generation(self._shard_dir / fmt.COMMIT_FILE)
            files.check_chunks_present(self._shard_dir / "grads", rows, cr, 2, "shard grads")
            files.check_chunks_present(
                self._shard_dir / "ids", rows, cr, self._ids.rank, "shard ids"
            )
        self.committed_rows = self._opened_rows = self._recorded_rows = rows or 0
        self._accepted = self.committed_rows
        rows = self.committed_rows
        self._build_index()
        self._next_row = self.committed_rows  # first row of the chunk being filled
        # A ring of reused chunk buffers: batches are copied into the current one, a full one is
        # handed to tensorstore, and a buffer is refilled only once tensorstore has copied it
        # out. Fresh multi-MB arrays per chunk cost more in page faults than the copy itself.
        n_slots = self.max_in_flight + 1
        st = np.dtype(meta["storage_dtype"])
        self._ring_rows = [files.aligned_empty((cr, self.dim), st) for _ in range(n_slots)]
        id_shape = (cr,) if self._id_kind == "int" else (cr, self._max_id_bytes)
        id_dtype = np.int64 if self._id_kind == "int" else np.uint8
        self._ring_ids = [np.zeros(id_shape, id_dtype) for _ in range(n_slots)]
        self._ring_busy: list = [None] * n_slots  # futures: tensorstore has copied the buffer
        self._slot = 0
        self._fill = 0  # rows in the current buffer
        self._acc_state = None
        if self._statistics:
            dt = acc_dtype(self.dtype)
            cached = load_fisher(self._shard_dir, rows, len(self.layers)) if rows else None
            if cached is not None:
                zeros = {f"layer_{i}": jnp.zeros((1, l.dim), dt) for i, l in enumerate(self.layers)}
                self._acc_state = _ACC.init(zeros)._replace(
                    sum_outer={f"layer_{i}": jnp.asarray(s, dt) for i, s in enumerate(cached)},
                    count=jnp.asarray(rows, jnp.int32),
                )
            else:  # killed before the sums were saved: recompute from the committed rows
                self._acc_state = fisher_sums_from_rows(
                    self._grads, rows, self.layers, self.dtype, cr
                )

    def _open_shard(self, rows: int | None) -> None:
        """Protocol step 2: open this shard's arrays, creating those that are absent."""
        cr = self.chunk_rows
        self._grads = self._open_or_create(
            "grads", (cr, self.dim), (cr, self.dim), self.meta["storage_dtype"], rows
        )
        if self._id_kind == "int":
            self._ids = self._open_or_create("ids", (cr,), (cr,), "<i8", rows)
        else:
            w = self._max_id_bytes
            self._ids = self._open_or_create("ids", (cr, w), (cr, w), "|u1", rows)
        if rows is None:
            _before_write("first commit record")
            self._write_record(0, files.generation(self._shard_dir / fmt.COMMIT_FILE))

    def _write_record(self, rows: int, if_equal) -> None:
        """Replace the commit record; on a kvstore only if it is still the one last seen."""
        gen = files.atomic_write_json(self._shard_dir / fmt.COMMIT_FILE, {"rows": rows}, if_equal)
        if gen is None:
            self._error = files.LogLockedError(
                f"the commit record {self._shard_dir / fmt.COMMIT_FILE} was changed by another "
                f"writer (its lock was removed while this writer held it); rows past "
                f"{self._recorded_rows} are not committed and this writer stops"
            )
            raise self._error
        self._commit_gen = gen

    def _build_index(self) -> None:
        """Index the ids committed in every shard as of now (this one included)."""
        self._index = IdIndex(self._id_kind)
        self._shard_arrays = {}  # shard number -> (name, ids array), to confirm hashed matches
        self._shard_numbers = {}  # shard name -> its number in the index
        self._indexed_rows = {}  # other shard name -> its committed rows held in the index
        # ids that other shards committed after some of this writer's rows were checked:
        # (rows accepted so far when they were read, their keys sorted, their stored ids)
        self._unchecked: list[tuple[int, np.ndarray, np.ndarray]] = []
        names = files.shard_names(self._root)
        if self.writer_id not in names:
            names = sorted(names + [self.writer_id])
        for name in names:
            if name == self.writer_id:
                num = self._own_number = len(self._shard_arrays)
                self._shard_numbers[name] = num
                self._shard_arrays[num] = (name, self._ids)
                for a in range(0, self.committed_rows, 1 << 16):
                    b = min(self.committed_rows, a + (1 << 16))
                    keys = id_keys(self._ids[a:b].read().result(), self._id_kind)
                    self._index.add(keys, num, np.arange(a, b))
            else:
                self._index_new_rows(name)

    def _index_new_rows(self, name: str):
        """Add the ids another shard committed since it was last indexed; returns them."""
        sd = self._root / "shards" / name
        n = files.committed_rows(sd) or 0
        if name not in self._shard_numbers:
            self._shard_numbers[name] = len(self._shard_arrays)
            self._shard_arrays[self._shard_numbers[name]] = (name, None)
            self._indexed_rows[name] = 0
        num, old = self._shard_numbers[name], self._indexed_rows[name]
        if n <= old:
            return None
        arr = self._shard_arrays[num][1]
        if arr is None or arr.shape[0] < n:  # the other writer grew its array since
            arr = files.open_array(sd / "ids", "log ids")
            self._shard_arrays[num] = (name, arr)
        new = []
        for a in range(old, n, 1 << 16):
            b = min(n, a + (1 << 16))
            stored = arr[a:b].read().result()
            self._index.add(id_keys(stored, self._id_kind), num, np.arange(a, b))
            new.append(stored)
        self._indexed_rows[name] = n
        return np.concatenate(new)

    def _create(self, grads: Mapping, ids_kind: str) -> None:
        layers = fmt.layers_from_grads(grads)
        fmt.check_projection_layers(self.projection, layers, "grads")
        dim = sum(l.dim for l in layers)
        chunk_rows = self._chunk_rows_arg or max(
            1, _TARGET_CHUNK_BYTES // (dim * fmt.DTYPES[self.dtype][1].itemsize)
        )
        meta = fmt.new_metadata(
            layers, self.projection, self.dtype, chunk_rows, ids_kind, self._max_id_bytes
        )
        _before_write("metadata")
        files.create_json_exclusive(self._root / fmt.METADATA_FILE, meta)
        # another writer may have won the race: attach to whatever is there, after checking it
        self._attach(fmt.load_metadata(self._root))

    # -- writing

    @property
    def num_rows(self) -> int:
        """Rows accepted by this writer's shard (committed + in flight + buffered)."""
        return self._next_row + self._fill if self.meta else 0

    def __contains__(self, data_id) -> bool:
        if self.meta is None:
            return False
        stored, _, _ = fmt.normalize_ids([data_id], 1, self._id_kind, self._max_id_bytes)
        return bool(self._duplicates(stored)[0])

    def _raise_if_failed(self):
        if self._error is not None:
            raise RuntimeError(
                f"log writer for {self._shard_dir} failed earlier: {self._error!r}"
            ) from self._error
        if self._closed:
            raise ValueError(f"log writer for {self.path} is closed")

    def _duplicates(self, stored: np.ndarray) -> np.ndarray:
        """Bool [n]: which ids (storage form) are already in the log, hash matches confirmed."""
        stored_ids = fmt.ids_to_storage(stored, self._id_kind, self._max_id_bytes)
        keys = id_keys(stored_ids, self._id_kind)
        if self._index.exact:
            return self._index.member(keys)
        hits = self._index.candidates(keys)
        dup = np.zeros(len(stored), bool)
        if any(s == self._own_number and r >= self.committed_rows for _, s, r in hits):
            self.flush()  # confirm against rows of this writer that are still in flight
            hits = self._index.candidates(keys)  # the flush's commits may have indexed more
        by_shard = collections.defaultdict(list)
        for i, s, r in hits:
            by_shard[s].append((i, r))
        for s, pairs in by_shard.items():
            arr = self._shard_arrays[s][1]
            got = arr[np.asarray([r for _, r in pairs])].read().result()
            for (i, _), row in zip(pairs, got):
                if bytes(row) == bytes(stored_ids[i]):
                    dup[i] = True
        return dup

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
            n = fmt.check_grads(grads, fmt.layers_from_grads(grads), "grads")
            kind = fmt.normalize_ids(ids, n, None, self._max_id_bytes)[2]
            self._create(grads, kind)
        n = fmt.check_grads(grads, self.layers, "grads")
        id_arr, keys, _ = fmt.normalize_ids(ids, n, self._id_kind, self._max_id_bytes)
        if len(set(keys)) != len(keys):
            dup = [k for k, c in collections.Counter(keys).items() if c > 1][:5]
            raise ValueError(f"duplicate data ids within one batch: {dup}")
        keep = ~self._duplicates(id_arr)
        if not keep.all() and self.on_duplicate == "error":
            dup = [k for k, m in zip(keys, keep) if not m][:5]
            raise ValueError(
                f"data ids already in the log {self.path}: {dup} "
                "(use on_duplicate='skip' to resume an interrupted run)"
            )
        if not keep.any():
            return WriteHandle(self, self.committed_rows)
        rows, bad_in, bad_cast = _pack(dict(grads), tuple(self.layers), self.dtype)
        bad_in, bad_cast = np.asarray(bad_in), np.asarray(bad_cast)
        over = bad_cast & ~bad_in & keep[:, None]
        if over.any():
            r, j = np.argwhere(over)[0]
            raise ValueError(
                f"grads: row {int(r)} (id {keys[int(r)]!r}) of layer "
                f"{self.layers[int(j)].path!r} overflows {self.dtype} (a finite value beyond "
                f"its range); scale the gradients or log float32"
            )
        bad_rows = bad_in.any(1) & keep
        if bad_rows.any():
            if self.on_nonfinite == "error":
                r, j = np.argwhere(bad_in & keep[:, None])[0]
                raise ValueError(
                    f"grads: row {int(r)} (id {keys[int(r)]!r}) has a NaN or Inf in layer "
                    f"{self.layers[int(j)].path!r} ({int(bad_rows.sum())} such row(s) in "
                    "this batch; on_nonfinite='skip' drops them)"
                )
            keep = keep & ~bad_rows
            if not keep.any():
                return WriteHandle(self, self.committed_rows)
        # the errors above wrote nothing of this batch and leave the writer usable; one below
        # may have left part of it in flight, so the writer refuses further writes
        try:
            if self._acc_state is not None:
                self._acc_state = _acc_rows(self._acc_state, rows, keep, tuple(self.layers))
            host = np.asarray(rows)  # waits for this batch's compute only
            if not keep.all():
                host, id_arr = host[keep], id_arr[keep]
            stored = fmt.ids_to_storage(id_arr, self._id_kind, self._max_id_bytes)
            self._append(fmt.storage(host, self.dtype), stored)
            self._reap(block=False)
        except BaseException as e:
            self._error = e
            raise
        return WriteHandle(self, self.num_rows)

    def _append(self, rows: np.ndarray, ids: np.ndarray) -> None:
        """Copy rows into the ring; hand each chunk to tensorstore as soon as it is full."""
        start = self.num_rows
        self._accepted = start + len(ids)  # rows checked for duplicates (see _commit)
        self._index.add(
            id_keys(ids, self._id_kind), self._own_number, np.arange(start, start + len(ids))
        )
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

    def _grow(self, arr, stop: int):
        """Protocol step 3: grow one array (one metadata write) to hold rows [0, stop)."""
        if stop <= arr.shape[0]:
            return arr
        _before_write("grow")
        cap = max(stop, 2 * arr.shape[0])
        cap = -(-cap // self.chunk_rows) * self.chunk_rows
        return arr.resize(exclusive_max=[cap] + [None] * (arr.rank - 1), expand_only=True).result()

    def _issue(self) -> None:
        """Hand the current buffer's rows to tensorstore and move to the next ring slot."""
        count = self._fill
        start, stop = self._next_row, self._next_row + count
        if self._grads is None:
            self._open_shard(files.committed_rows(self._shard_dir))
        self._grads = self._grow(self._grads, stop)
        self._ids = self._grow(self._ids, stop)
        self._shard_arrays[self._own_number] = (self.writer_id, self._ids)
        _before_write("grads chunk")
        f1 = self._grads[start:stop].write(self._ring_rows[self._slot][:count])
        _before_write("ids chunk")
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

    def _commit(self) -> None:
        """Protocol step 4: the commit record names the durable prefix.

        Under the log's commit lock (held for this step only, never across chunk writes), the
        ids that other shards committed since they were last indexed are read and the rows
        about to be committed are checked against them, so that two writers running at once
        never both commit one id: the rows committed first win.
        """
        lock = files.ShardLock(self._root, files.COMMIT_LOCK_FILE, wait_s=60.0)
        with lock:
            for name in files.shard_names(self._root):
                if name != self.writer_id:
                    new = self._index_new_rows(name)
                    if new is not None:
                        keys = id_keys(new, self._id_kind)
                        order = np.argsort(keys, kind="stable")
                        self._unchecked.append((self._accepted, keys[order], new[order]))
            lo, hi = self._recorded_rows, self.committed_rows
            dup = np.zeros(0, int)
            if self._unchecked and max(u[0] for u in self._unchecked) > lo:
                # rows [lo, hi) are written (their futures completed): read their ids back
                own = self._ids[lo:hi].read().result()
                dup = np.nonzero(self._unseen_duplicates(own, np.arange(lo, hi)))[0] + lo
            if len(dup):
                self.committed_rows = int(dup[0])
            else:
                self._unchecked = [u for u in self._unchecked if u[0] > hi]
            _before_write("commit record")
            self._write_record(self.committed_rows, self._commit_gen)
            self._recorded_rows = self.committed_rows
        if len(dup):  # outside the lock: resolving may wait for writes and commit again
            self._resolve_duplicates(int(dup[0]))

    def _unseen_duplicates(self, own: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Bool mask: which of this shard's ids (stored at ``rows``) another writer committed
        after they were accepted (``_unchecked``), hash matches confirmed on the stored ids."""
        own_keys = id_keys(own, self._id_kind)
        dup = np.zeros(len(rows), bool)
        for mark, keys, stored in self._unchecked:
            lo = np.searchsorted(keys, own_keys, "left")
            hi = np.searchsorted(keys, own_keys, "right")
            for i in np.nonzero((hi > lo) & (rows < mark))[0]:
                dup[i] = self._index.exact or any(
                    bytes(stored[j]) == bytes(own[i]) for j in range(lo[i], hi[i])
                )
        return dup

    def _resolve_duplicates(self, first: int) -> None:
        """Rows from ``first`` on are not committed: raise, or append them again without the
        ids that another writer committed first."""
        name = fmt.ids_from_storage(
            self._ids[first : first + 1].read().result(), self._id_kind
        ).tolist()
        if self.on_duplicate == "error":
            self._error = ValueError(
                f"data id {name[0]!r} (row {first} of shard {self.writer_id}) was committed to "
                f"the log {self.path} by another writer running at the same time; the rows "
                "before it are committed and this writer stops (on_duplicate='skip' drops "
                "such rows instead)"
            )
            raise self._error
        # wait for the writes in flight (not committed), read back every row past the prefix
        for p in self._pending:
            for f in p.futures:
                f.result()
        self._pending.clear()
        for i, busy in enumerate(self._ring_busy):
            for f in busy or ():
                f.result()
            self._ring_busy[i] = None
        stop = self._next_row
        grads = np.concatenate(
            [self._grads[first:stop].read().result(), self._ring_rows[self._slot][: self._fill]]
        )
        ids = np.concatenate(
            [self._ids[first:stop].read().result(), self._ring_ids[self._slot][: self._fill]]
        )
        keep = ~self._unseen_duplicates(ids, np.arange(first, first + len(ids)))
        not_copied = self._accepted - (stop + self._fill)  # rest of a batch being appended
        self._drops.append(np.nonzero(~keep)[0] + first)
        if self._acc_state is not None:  # take the dropped rows out of the Fisher sums
            gone = jnp.asarray(fmt.values(grads[~keep], self.dtype))
            zero = jax.tree.map(jnp.zeros_like, self._acc_state)
            sub = _acc_rows(zero, gone, jnp.ones((len(gone),)), tuple(self.layers))
            self._acc_state = jax.tree.map(lambda a, b: a - b, self._acc_state, sub)
        self._next_row, self._fill, self._slot = first, 0, 0
        self._append(grads[keep], ids[keep])
        # the rows appended again are checked; the rest of that batch still has to be
        self._accepted = self.num_rows + not_copied
        self._unchecked = [(self._accepted, k, v) for _, k, v in self._unchecked]

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
                self._commit()

    def flush(self, upto: int | None = None) -> None:
        """Write buffered rows (a partial last chunk too) and wait until they are committed."""
        self._raise_if_failed()
        if self.meta is None:
            return
        # a commit that drops rows (see _commit) may refill the buffer: loop until done
        while True:
            if self._fill and (upto is None or upto > self._next_row):
                try:
                    self._issue()
                except BaseException as e:
                    self._error = e
                    raise
            elif self._pending and (upto is None or self.committed_rows < upto):
                self._reap(block=True, one=True)
            else:
                break

    def close(self) -> None:
        """Flush, save the shard's Fisher sums, trim its arrays and release its lock.

        Writes nothing when no row was added since the writer opened.
        """
        if self._closed:
            return
        try:
            if self.meta is not None and self._error is None:
                self.flush()
                if self.committed_rows > self._opened_rows:
                    self._finish()
        finally:
            self._closed = True
            self._release()

    def _finish(self) -> None:
        """Protocol step 5 (only after rows were added)."""
        if self._acc_state is not None:
            full = _full_sums(self._acc_state.sum_outer)
            sums = [full[f"layer_{i}"] for i in range(len(self.layers))]
            _before_write("fisher version")
            save_fisher(self._shard_dir, sums, self.committed_rows)
        cap = -(-max(self.committed_rows, 1) // self.chunk_rows) * self.chunk_rows
        for name in ("_grads", "_ids"):
            arr = getattr(self, name)
            if cap < arr.shape[0]:
                _before_write("trim")
                arr = arr.resize(exclusive_max=[cap] + [None] * (arr.rank - 1), shrink_only=True)
                setattr(self, name, arr.result())

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
