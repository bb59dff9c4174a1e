import jax
import jax.numpy as jnp
import numpy as np

from jaxinf._src.statistics import projected_covariance


def test_projected_covariance_matches_dense_mean_of_outer_products():
    rng = np.random.default_rng(0)
    batches = [{"a": rng.normal(size=(5, 3, 2)), "b": rng.normal(size=(5, 4))} for _ in range(3)]
    acc = projected_covariance()
    update = jax.jit(acc.update)
    state = acc.init(batches[0])
    for b in batches:
        state = update(state, b)
    cov = acc.finalize(state)
    for layer in ("a", "b"):
        rows = np.concatenate([b[layer].reshape(5, -1) for b in batches])
        # float64 accumulation of the same sum: agreement to rounding.
        np.testing.assert_allclose(cov[layer], rows.T @ rows / len(rows), rtol=1e-12)
    assert cov["a"].shape == (6, 6) and cov["a"].dtype == jnp.float64
