"""New public helpers: scan_in_place equals lax.scan (forward, reverse, under jit and vmap);
cumsum equals numpy's cumulative sum (floats to rounding, integers exactly, under jit and vmap);
normalise_with_ess equals normalise plus the ESS; step_with_keys under jit and vmap; and the
particle filter's check of a tree_at-made model with a bad value (names the field)."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp
import equinox as eqx
from jax import lax

import probssm as ps
from probssm.core.scan import cumsum, cumulative_weights, scan_in_place, two_level_size
from probssm.inference.smc import common as C


def _step(c, x):
    c = 0.9 * c + x[0] * x[1]
    return c, (c, c * x[1])


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_in_place_equals_lax_scan_under_jit_and_vmap(reverse):
    xs = (jnp.arange(12.0).reshape(6, 2), jnp.linspace(-1, 1, 12).reshape(6, 2))
    ref = lax.scan(_step, jnp.zeros(2), xs, reverse=reverse)
    got = jax.jit(lambda x: scan_in_place(_step, jnp.zeros(2), x, reverse=reverse))(xs)
    for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
        np.testing.assert_allclose(b, a, rtol=1e-12)
    batch = jax.tree_util.tree_map(lambda a: jnp.stack([a, 2 * a]), xs)
    vref = jax.vmap(lambda x: lax.scan(_step, jnp.zeros(2), x, reverse=reverse))(batch)
    vgot = jax.vmap(lambda x: scan_in_place(_step, jnp.zeros(2), x, reverse=reverse))(batch)
    for a, b in zip(jax.tree_util.tree_leaves(vref), jax.tree_util.tree_leaves(vgot)):
        np.testing.assert_allclose(b, a, rtol=1e-12)
    assert two_level_size(1) == 8 and two_level_size(10_000) == 100


@pytest.mark.parametrize("n", [1, 15, 16, 17, 256, 257, 1000])
def test_cumsum_equals_numpy_under_jit_and_vmap(n):
    """Lengths around the block of 16 and its square (two levels of row totals)."""
    rng = np.random.default_rng(n)
    x = rng.uniform(size=(3, n))
    k = rng.integers(0, 1000, size=(3, n)).astype(np.int32)
    got = jax.jit(jax.vmap(cumsum))(jnp.asarray(x))
    np.testing.assert_allclose(got, np.cumsum(x, axis=1), rtol=1e-13)
    got_int = jax.jit(jax.vmap(cumsum))(jnp.asarray(k))
    assert got_int.dtype == jnp.int32
    np.testing.assert_array_equal(got_int, np.cumsum(k, axis=1))
    np.testing.assert_allclose(cumsum(jnp.asarray(x[0], jnp.float32)), np.cumsum(x[0]), rtol=1e-5)


@pytest.mark.parametrize("fast", [False, True])
def test_cumulative_weights_under_jit_and_vmap_and_bad_shapes(fast):
    w = np.random.default_rng(0).uniform(size=(3, 100))
    w[:, 10:20] = 0.0
    got = jax.jit(jax.vmap(lambda v: cumulative_weights(v, fast=fast)))(jnp.asarray(w))
    ref = np.cumsum(w, axis=1) / w.sum(1, keepdims=True)
    np.testing.assert_allclose(got, ref, rtol=1e-13)
    assert np.all(np.asarray(got)[:, -1] == 1.0)
    with pytest.raises(ValueError, match="weights: expected a 1-d array"):
        cumulative_weights(jnp.ones((2, 3)), fast=fast)
    with pytest.raises(ValueError, match="values: expected a 1-d array"):
        cumsum(jnp.ones((2, 3)))


def test_normalise_with_ess_under_jit_and_vmap():
    lw = jnp.array([[0.0, -1.0, jnp.nan, -3.0], [-jnp.inf] * 4])
    normed, log_sum, w, ess = jax.jit(jax.vmap(C.normalise_with_ess))(lw)
    for i in range(2):
        n_ref, ls_ref = C.normalise(lw[i])
        np.testing.assert_allclose(normed[i], n_ref, rtol=1e-12)
        np.testing.assert_allclose(log_sum[i], ls_ref, rtol=1e-12)
        np.testing.assert_allclose(w[i].sum(), 1.0, rtol=1e-12)
        np.testing.assert_allclose(ess[i], 1.0 / np.sum(np.asarray(w[i]) ** 2), rtol=1e-12)
    assert float(ess[1]) == 4.0  # all -inf: uniform weights


def test_step_with_keys_under_jit_and_vmap():
    model = ps.models.StochasticVolatility(-1.0, 0.95, 0.2)
    state = ps.smc.filter.init(jax.random.PRNGKey(0), model, jnp.zeros(1), None, 64)
    keys = tuple(jax.random.split(jax.random.PRNGKey(1), 3))
    run = lambda ks: ps.smc.filter.step_with_keys(ks, model, state, 1, jnp.ones(1), None, None)
    new, info, w = jax.jit(run)(keys)
    assert new.particles.shape == (64, 1) and w.shape == (64,)
    np.testing.assert_allclose(float(jnp.sum(w)), 1.0, rtol=1e-12)
    np.testing.assert_allclose(info.ess, 1.0 / jnp.sum(w * w), rtol=1e-12)
    batched = jax.vmap(run)(tuple(jnp.stack([k, k]) for k in keys))
    np.testing.assert_allclose(batched[0].particles[0], new.particles, rtol=1e-12)


def test_particle_filter_rejects_tree_at_model_with_bad_value():
    model = ps.models.StochasticVolatility(-1.0, 0.95, 0.2)
    bad = eqx.tree_at(lambda m: m.sigma, model, -1.0)
    with pytest.raises(ValueError, match="sigma"):
        ps.smc.particle_filter(jax.random.PRNGKey(2), bad, jnp.ones((5, 1)), 16)


def test_sequence_cores_check_a_concrete_model_made_by_tree_at():
    # the single-sequence cores check a concrete model before tracing anything (no compilation
    # here); under the caller's jit the parameters are traced and the check is skipped
    model = ps.models.StochasticVolatility(-1.0, 0.95, 0.2)
    bad = eqx.tree_at(lambda m: m.sigma, model, -1.0)
    key, y = jax.random.PRNGKey(3), jnp.ones((5, 1))
    h = lambda zp, z, t, yy, u: z
    calls = {
        "particle_filter_sequence": lambda m: ps.smc.particle_filter_sequence(key, m, y, num_particles=8),
        "paris_sequence": lambda m: ps.smc.paris_sequence(key, m, y, additive_functional=h, num_particles=8),
        "ppg_sequence": lambda m: ps.smc.ppg_sequence(key, m, y, additive_functional=h, num_particles=8,
                                                      num_iters=2),
        "conditional_smc_sequence": lambda m: ps.smc.conditional_smc_sequence(key, m, y, reference=jnp.zeros((5, 1)),
                                                                              num_particles=8),
        "smoother_sequence": lambda m: ps.smc.smoother_sequence(key, m, y, num_particles=8),
        "backward_sample_sequence": lambda m: ps.smc.backward_sample_sequence(key, m, None),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="sigma"):
            call(bad)
    traced = jax.eval_shape(lambda s: ps.smc.particle_filter_sequence(
        key, eqx.tree_at(lambda m: m.sigma, model, s), y, num_particles=8).log_likelihood, -1.0)
    assert traced.shape == ()
