"""The custom-VJP taps: identity on the forward pass; statistics as "gradients" of zero inputs.

A tap sits on a layer's output ``y``. Its backward pass hands ``dy`` back unchanged, so the
loss and every parameter gradient are exactly those of the plain model, and returns, as the
cotangent of a zero input, the statistic of that example's layer inputs and output gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# ---------------------------------------------------------------------------------------------
# The taps: identity on the forward pass; statistics as "gradients" of zero inputs


@jax.custom_vjp
def _logra_tap(y, pa, b, p_out):
    """Identity in ``y``; the cotangent of the zero ``b [k_out, k_in]`` is sum_t (P_out d_t)(pa_t)^T."""
    return y


def _logra_fwd(y, pa, b, p_out):
    return y, (pa, p_out, b)


def _logra_bwd(res, dy):
    pa, p_out, b = res
    d = dy.reshape(-1, p_out.shape[1]).astype(p_out.dtype)
    g = jnp.einsum("to,ko,ti->ki", d, p_out, pa.astype(p_out.dtype))
    # B = 0, so no gradient flows back into the projected inputs.
    return dy, jnp.zeros_like(pa), g.astype(b.dtype), jnp.zeros_like(p_out)


_logra_tap.defvjp(_logra_fwd, _logra_bwd)


@jax.custom_vjp
def _kfac_tap(y, a, m, s):
    """Identity in ``y``; the cotangent of ``s = (C_F, C_B, count)`` zeros is the layer's sums."""
    return y


def _kfac_fwd(y, a, m, s):
    return y, (a, m, s)


def _kfac_bwd(res, dy):
    a, m, s = res
    sf, sb, sn = s
    d = dy.reshape(-1, sb.shape[0]).astype(sb.dtype)
    # Under vmap with `s` unbatched, JAX sums a cotangent over the batch only if it is batched.
    # `a` and `m` may not depend on the example (e.g. a positional Embed of arange(T)), so tie
    # the mask to `dy`, which always does; otherwise those sums would count one example only.
    m = m.astype(sb.dtype) * (1 + 0 * d[0, 0])
    a = a.astype(sf.dtype)
    cf = jnp.einsum("ti,t,tj->ij", a, m, a)
    cb = jnp.einsum("ti,t,tj->ij", d, m, d)
    return dy, jnp.zeros_like(a), jnp.zeros_like(res[1]), (cf, cb, jnp.sum(m).astype(sn.dtype))


_kfac_tap.defvjp(_kfac_fwd, _kfac_bwd)


@jax.custom_vjp
def _acts_tap(y, a, za, zd):
    """Identity in ``y``; the cotangents of the zeros ``za``/``zd`` are ``a`` and ``dy`` itself."""
    return y


def _acts_fwd(y, a, za, zd):
    return y, (a, zd)


def _acts_bwd(res, dy):
    a, zd = res
    return dy, jnp.zeros_like(a), a, dy.reshape(zd.shape).astype(zd.dtype)


_acts_tap.defvjp(_acts_fwd, _acts_bwd)
