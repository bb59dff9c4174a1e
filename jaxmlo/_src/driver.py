"""``run``: drive a compiled program step with data, logging, validation and checkpoints.

Resuming is exact: the data position is a function of the program step (problem ``n``'s
``t``-th batch of step ``s`` is item ``s * unroll_steps + t`` of its source), the whole
:class:`jaxmlo.ProgramState` is saved by orbax-checkpoint, and the early-stopping
bookkeeping is saved beside it; a run restored from step ``s`` replays exactly what an
uninterrupted run does after step ``s``.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxmlo._src.engine import ProgramState, init, make_step
from jaxmlo._src.program import Program

__all__ = ["RunResult", "run", "save_checkpoint", "restore_checkpoint"]


class RunResult(NamedTuple):
    """What :func:`run` returns.

    Attributes:
      state: the final :class:`jaxmlo.ProgramState`.
      history: ``[(step, {metric: float})]`` at every logged step.
      validations: ``[(step, score)]`` at every validation.
      best_score: best validation score (``None`` without validation).
      best_step: program step of ``best_score``.
      stopped_early: whether ``patience`` ended the run.
      skipped: program steps whose update was dropped for a non-finite number
        (``on_nonfinite="skip"``).
    """

    state: ProgramState
    history: list
    validations: list
    best_score: float | None
    best_step: int | None
    stopped_early: bool
    skipped: list = []


class _Source:
    """Batch ``i`` of one problem: from a callable ``fn(i)`` or an iterable, read in order."""

    def __init__(self, name, src, start):
        self.name = name
        if callable(src) and not hasattr(src, "__iter__"):
            self._fn, self._it = src, None
        else:
            self._fn, self._it = None, iter(src)
            for _ in range(start):  # an iterable cannot seek: skip what earlier steps consumed
                self._next()
        self._pos = start

    def _next(self):
        try:
            return next(self._it)
        except StopIteration:
            raise ValueError(
                f"run: data source for problem {self.name!r} ran out of batches"
            ) from None

    def take(self, n):
        if self._fn is not None:
            out = [self._fn(self._pos + t) for t in range(n)]
        else:
            out = [self._next() for _ in range(n)]
        self._pos += n
        return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *out)


def _manager(directory, max_to_keep):
    import orbax.checkpoint as ocp  # heavy import, only when checkpointing

    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )


def save_checkpoint(
    directory,
    state: ProgramState,
    extra: dict | None = None,
    *,
    max_to_keep: int | None = None,
):
    """Saves ``state`` (and a JSON-able ``extra`` dict) as checkpoint ``int(state.step)``."""
    import orbax.checkpoint as ocp

    mngr = _manager(directory, max_to_keep)
    mngr.save(
        int(state.step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(dict(extra or {}))
        ),
    )
    mngr.wait_until_finished()
    mngr.close()


def restore_checkpoint(directory, target: ProgramState, step: int | None = None):
    """Restores ``(state, extra)`` from ``directory`` (latest step unless ``step``).

    Args:
      directory: checkpoint directory written by :func:`save_checkpoint` or :func:`run`.
      target: a state with the right structure, shapes and dtypes (e.g. ``jaxmlo.init(prog)``).
      step: which checkpoint; ``None`` for the latest.

    Returns:
      ``(state, extra)``, or ``(None, None)`` when the directory holds no checkpoint.
    """
    import orbax.checkpoint as ocp

    if not os.path.isdir(directory):
        return None, None
    mngr = _manager(directory, None)
    step = mngr.latest_step() if step is None else step
    if step is None:
        mngr.close()
        return None, None
    abstract = jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
            if not isinstance(x, jax.ShapeDtypeStruct)
            else x
        ),
        target,
    )
    out = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()
        ),
    )
    mngr.close()
    return out["state"], dict(out["extra"] or {})


def run(
    program: Program,
    data: Mapping[str, Any],
    num_steps: int,
    *,
    state: ProgramState | None = None,
    callback: Callable[[int, dict], Any] | None = None,
    log_every: int = 1,
    validate: Callable[[ProgramState], float] | None = None,
    validate_every: int = 0,
    patience: int | None = None,
    mode: str = "min",
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 0,
    max_to_keep: int | None = 2,
    resume: bool = True,
    step_fn: Callable | None = None,
    progress: bool = True,
    on_nonfinite: str = "raise",
) -> RunResult:
    """Runs ``num_steps`` program steps (counting from step 0, resumed steps included).

    Args:
      program: the :class:`jaxmlo.Program`.
      data: ``{name: source}`` for every problem; a source is a callable ``fn(i) -> batch``
        (exact, seekable resume) or an iterable of batches (resume skips consumed items).
        The driver stacks ``unroll_steps`` batches per problem and step.
      num_steps: total program steps of the run.
      state: starting state (default ``jaxmlo.init(program)``); replaced by the latest
        checkpoint when ``checkpoint_dir`` holds one and ``resume``.
      callback: ``callback(step, metrics)`` every ``log_every`` steps with float metrics
        (per-problem losses, gradient and hypergradient norms; ``"val/score"`` when validated).
      log_every: metric logging period (reading metrics synchronises with the device).
      validate: ``validate(state) -> float`` user validation (e.g. accuracy of a model).
      validate_every: validation period in steps (0: never).
      patience: stop after this many validations without improvement (``None``: never).
      mode: ``"min"`` or ``"max"``, the better direction of the validation score.
      checkpoint_dir: where orbax checkpoints go (``None``: no checkpoints).
      checkpoint_every: checkpoint period in steps; the last step is always saved.
      max_to_keep: checkpoints kept (``None``: all).
      resume: restore the latest checkpoint in ``checkpoint_dir`` first.
      step_fn: a compiled ``step_fn(state, batches)``; default ``make_step(program)``.
        Pass one to reuse its compilation across runs.
      progress: show a tqdm progress bar.
      on_nonfinite: what a step whose loss, gradient or hypergradient norm is not finite
        (NaN or infinity) does. ``"raise"``: stop with a ``FloatingPointError`` naming the
        problem, the metric and the step; the state and checkpoints stay those of the last
        good step. ``"skip"``: drop that step's update (parameters and optimizer states stay
        as they were; the step counter advances, so the data position stays a function of
        the step) and go on; skipped steps are listed in ``RunResult.skipped``.

    Returns:
      A :class:`RunResult`. A validation score that is not finite is recorded but never
      becomes the best one, and counts as a validation without improvement.

    Raises:
      ValueError: naming the argument, on a non-integer or negative period or step count,
        ``patience`` < 1, ``patience`` or ``validate_every`` without the other or without
        ``validate``, an unknown ``mode`` or ``on_nonfinite``.
      FloatingPointError: with ``on_nonfinite="raise"``, on a non-finite loss, gradient or
        hypergradient.
    """
    _check_run_args(
        num_steps=num_steps,
        log_every=log_every,
        validate=validate,
        validate_every=validate_every,
        patience=patience,
        mode=mode,
        checkpoint_every=checkpoint_every,
        max_to_keep=max_to_keep,
        on_nonfinite=on_nonfinite,
    )
    missing = [n for n in program.order if n not in data]
    if missing:
        raise ValueError(f"run: no data source for problem(s) {missing}")
    state = init(program) if state is None else state
    book = {"best_score": None, "best_step": None, "bad": 0, "stopped": False}
    if checkpoint_dir is not None and resume:
        restored, extra = restore_checkpoint(checkpoint_dir, state)
        if restored is not None:
            state = restored
            book.update(extra)
    step_fn = make_step(program) if step_fn is None else step_fn
    start = int(state.step)
    sources = {
        n: _Source(n, data[n], start * program.problems[n].unroll_steps) for n in program.order
    }
    history, validations = [], list(book.pop("validations", []))
    skipped = list(book.pop("skipped", []))
    better = (lambda a, b: a < b) if mode == "min" else (lambda a, b: a > b)

    def ckpt(s):
        save_checkpoint(
            checkpoint_dir,
            s,
            dict(book, validations=validations, skipped=skipped),
            max_to_keep=max_to_keep,
        )

    bar = tqdm(total=num_steps, initial=start, disable=not progress, desc="jaxmlo")
    stopped = bool(book["stopped"])
    try:
        for i in range(start, num_steps):
            if stopped:
                break
            batches = {n: src.take(program.problems[n].unroll_steps) for n, src in sources.items()}
            new_state, metrics = step_fn(state, batches)
            done = i + 1
            bad = _first_nonfinite(program, metrics)
            if bad is not None:
                name, key, value = bad
                if on_nonfinite == "raise":
                    raise FloatingPointError(
                        f"run: step {done}: problem {name!r} has a non-finite {key} ({value}); "
                        f"the run stopped before training on it (state and checkpoints are "
                        f"those of step {done - 1}). Pass on_nonfinite='skip' to drop such "
                        f"steps instead"
                    )
                skipped.append(done)
                new_state = state._replace(step=state.step + 1)
            state = new_state
            logged = None
            if validate is not None and validate_every and done % validate_every == 0:
                score = float(validate(state))
                validations.append((done, score))
                if math.isfinite(score) and (
                    book["best_score"] is None or better(score, book["best_score"])
                ):
                    book.update(best_score=score, best_step=done, bad=0)
                else:
                    book["bad"] += 1
                if patience is not None and book["bad"] >= patience:
                    stopped = book["stopped"] = True
                logged = {"val/score": score}
            if log_every and (done % log_every == 0 or logged is not None):
                logged = dict({k: float(v) for k, v in metrics.items()}, **(logged or {}))
                history.append((done, logged))
                if callback is not None:
                    callback(done, logged)
                bar.set_postfix(
                    {k: f"{v:.3g}" for k, v in logged.items() if k.endswith("loss")}, refresh=False
                )
            if checkpoint_dir is not None and (
                (checkpoint_every and done % checkpoint_every == 0) or done == num_steps or stopped
            ):
                ckpt(state)
            bar.update(1)
    finally:
        bar.close()
    return RunResult(
        state=state,
        history=history,
        validations=validations,
        best_score=book["best_score"],
        best_step=book["best_step"],
        stopped_early=stopped,
        skipped=skipped,
    )


def _first_nonfinite(program, metrics):
    """``(problem, metric, value)`` of the first non-finite per-problem metric, else None."""
    values = jax.device_get(metrics)
    for name in program.order:
        for key in ("loss", "grad_norm", "hypergrad_norm"):
            v = values.get(f"{name}/{key}")
            if v is not None and not np.all(np.isfinite(v)):
                return name, key, float(v)
    return None


def _check_run_args(**kw):
    def count(name, low, allow_none=False):
        v = kw[name]
        if v is None and allow_none:
            return
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
            raise ValueError(f"run: {name} must be an int >= {low}, got {v!r}")

    count("num_steps", 0)
    count("log_every", 0)
    count("validate_every", 0)
    count("checkpoint_every", 0)
    count("patience", 1, allow_none=True)
    count("max_to_keep", 1, allow_none=True)
    if kw["mode"] not in ("min", "max"):
        raise ValueError(f"run: mode must be 'min' or 'max', got {kw['mode']!r}")
    if kw["on_nonfinite"] not in ("raise", "skip"):
        raise ValueError(f"run: on_nonfinite must be 'raise' or 'skip', got {kw['on_nonfinite']!r}")
    if kw["validate_every"] and kw["validate"] is None:
        raise ValueError("run: validate_every > 0 needs a validate function")
    if kw["validate"] is not None and not kw["validate_every"]:
        raise ValueError("run: validate is given but validate_every is 0 (never validated)")
    if kw["patience"] is not None and not kw["validate_every"]:
        raise ValueError("run: patience needs validation (validate and validate_every > 0)")
