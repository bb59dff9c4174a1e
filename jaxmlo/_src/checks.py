"""Trace-time checks: structures, shapes and dtypes are static, so misuse raises at once with a
message naming the argument; factory arguments are checked when the method is built."""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import optax


def _struct(tree):
    return jax.tree.structure(tree), [
        (jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(tree)
    ]


def _check_optimizer(optimizer, name="optimizer"):
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"{name} must be an optax.GradientTransformation, got {type(optimizer).__name__}."
        )


def _check_same_tree(name, tree, ref, ref_name):
    t, leaves = _struct(tree)
    rt, rleaves = _struct(ref)
    if t != rt:
        raise ValueError(f"{name} must have the same pytree structure as {ref_name}: {t} vs {rt}.")
    for i, ((s, _), (rs, _)) in enumerate(zip(leaves, rleaves)):
        if s != rs:
            raise ValueError(f"{name} leaf {i} has shape {s} but {ref_name} has shape {rs}.")


def _check_opt_state(optimizer, params, opt_state, name="opt_state"):
    expected = jax.eval_shape(optimizer.init, params)
    if jax.tree.structure(opt_state) != jax.tree.structure(expected):
        raise ValueError(
            f"{name} does not match optimizer.init(params): it was made by another optimizer or "
            f"for other params (structure {jax.tree.structure(opt_state)} vs expected "
            f"{jax.tree.structure(expected)})."
        )
    for a, b in zip(jax.tree.leaves(opt_state), jax.tree.leaves(expected)):
        if jnp.shape(a) != b.shape:
            raise ValueError(
                f"{name} has a leaf of shape {jnp.shape(a)} where optimizer.init(params) has "
                f"{b.shape}: it was made for other params."
            )


def _check_floating(name, tree):
    for x in jax.tree.leaves(tree):
        if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            raise TypeError(
                f"{name} must hold floating-point arrays only, got dtype {jnp.result_type(x)}."
            )


def _check_scalar_loss(name, fn, *args):
    out = jax.eval_shape(fn, *args)
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(f"{name} must return a scalar, got {shape}.")


def _check_batches(batches):
    leaves = jax.tree.leaves(batches)
    if not leaves:
        raise ValueError("batches must be a non-empty pytree with a leading axis T (steps).")
    lens = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if None in lens or len(lens) != 1:
        raise ValueError(
            f"batches leaves must share one leading axis T (the unroll steps), got leading sizes {lens}."
        )


# Factory arguments (Python values, checked when a method is built).


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _check_real(name, value, *, positive=False):
    """A finite real number, ``> 0`` if ``positive`` else ``>= 0``."""
    bound = "> 0" if positive else ">= 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number {bound}, got {value!r}.")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}.")
    return float(value)
