"""Linear-Gaussian protocol: the public traceable Kalman cores, ragged batches (lengths, lists),
a user-written AbstractLinearGaussianSSM with inputs through ps.kalman and ps.learn.em
(generalised M-step), and EM edge cases."""
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints

import probssm as ps
from test_kalman import random_model

REAL = {"constraint": constraints.real}
PSD = {"constraint": constraints.positive_definite}


class UserLGSSM(ps.core.AbstractLinearGaussianSSM):
    """A user's own linear-Gaussian model, inputs entering the dynamics through B; it declares
    neither input_dim nor num_timesteps, and no closed-form M-step."""

    m1: jax.Array = eqx.field(metadata=REAL)
    P1: jax.Array = eqx.field(metadata=PSD)
    F: jax.Array = eqx.field(metadata=REAL)
    B: jax.Array = eqx.field(metadata=REAL)
    Q: jax.Array = eqx.field(metadata=PSD)
    H: jax.Array = eqx.field(metadata=REAL)
    R: jax.Array = eqx.field(metadata=PSD)

    @property
    def state_dim(self):
        return self.m1.shape[0]

    @property
    def emission_dim(self):
        return self.H.shape[0]

    def initial(self, inputs=None):
        return dist.MultivariateNormal(self.m1, covariance_matrix=self.P1)

    def transition(self, z_prev, t, inputs=None):
        return dist.MultivariateNormal(self.F @ z_prev + self.B @ inputs, covariance_matrix=self.Q)

    def emission(self, z, t, inputs=None):
        return dist.MultivariateNormal(self.H @ z, covariance_matrix=self.R)

    def linear_gaussian_params(self, num_timesteps, inputs=None):
        return ps.core.LinearGaussianParams(self.m1, self.P1, self.F, inputs @ self.B.T, self.Q, self.H,
                                            jnp.zeros(self.H.shape[0], self.H.dtype), self.R)


def pair(seed=0, d=2, p=2, T=60):
    """The same system as a LinearGaussianSSM and a UserLGSSM, data with inputs and a gap."""
    rng = np.random.default_rng(seed)
    truth = random_model(rng, d, p, inputs_dim=1)
    u = rng.normal(size=(T, 1))
    _, y = ps.sample(jax.random.PRNGKey(seed), truth, T, inputs=u)
    y = np.array(y)
    y[7, 0] = np.nan
    F0, H0, B0 = 0.5 * np.eye(d), rng.normal(size=(p, d)), np.zeros((d, 1))
    conc = ps.models.LinearGaussianSSM(np.zeros(d), np.eye(d), F0, np.eye(d), H0, np.eye(p),
                                       transition_input_matrix=B0)
    user = UserLGSSM(*(jnp.asarray(a) for a in (np.zeros(d), np.eye(d), F0, B0, np.eye(d), H0, np.eye(p))))
    return conc, user, y, u


def assert_tree_close(a, b, tol=1e-10):
    for x, z in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(z), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# Public traceable cores
# ---------------------------------------------------------------------------------------------
def test_cores_equal_model_level_under_jit_vmap_grad():
    conc, _, y, u = pair(1)
    params = conc.linear_gaussian_params(y.shape[0], jnp.asarray(u))
    s = ps.kalman.smoother(conc, y, inputs=u)
    assert_tree_close(jax.jit(ps.kalman.smoother_params)(params, y), s)
    z = jax.jit(ps.kalman.sample_params, static_argnums=3)(jax.random.PRNGKey(0), params, y, 3)
    assert z.shape == (3, y.shape[0], 2)
    np.testing.assert_allclose(z, ps.kalman.sample(jax.random.PRNGKey(0), conc, y, 3, inputs=u), atol=1e-10)
    # vmap over a batch of emissions, grad through the log-likelihood.
    ys = jnp.stack([y, y[::-1]])
    lls = jax.jit(jax.vmap(lambda yy: ps.kalman.filter_params(params, yy).log_likelihood))(ys)
    np.testing.assert_allclose(lls, ps.kalman.filter(conc, ys, inputs=u).log_likelihood, rtol=1e-10)
    g = jax.jit(jax.grad(lambda F: ps.kalman.filter_params(params._replace(transition_matrix=F), y).log_likelihood))(
        params.transition_matrix)
    assert np.all(np.isfinite(np.asarray(g)))


def test_lengths_and_lists_equal_separate_sequences():
    conc, _, y, u = pair(2)
    short = y[:35]
    padded = np.stack([y, np.concatenate([short, np.zeros((25, 2))])])  # padding not NaN: lengths must mask it
    lengths = np.array([60, 35])
    f = ps.kalman.filter(conc, padded, inputs=u, lengths=lengths)
    one = ps.kalman.filter(conc, short, inputs=u[:35])
    np.testing.assert_allclose(f.log_likelihood[1], one.log_likelihood, rtol=1e-12)
    np.testing.assert_allclose(f.filtered_means[1, :35], one.filtered_means, atol=1e-10)
    s = ps.kalman.smoother(conc, padded, inputs=u, lengths=lengths)
    np.testing.assert_allclose(s.smoothed_means[1, :35], ps.kalman.smoother(conc, short, inputs=u[:35])
                               .smoothed_means, atol=1e-9)
    ll = jax.jit(lambda ys, n: ps.kalman.log_likelihood(conc, ys, inputs=u, lengths=n))(padded, lengths)
    np.testing.assert_allclose(ll, f.log_likelihood.sum(), rtol=1e-12)
    # a list of sequences of different lengths, with a list of inputs
    fl = ps.kalman.filter(conc, [y, short], inputs=[u, u[:35]])
    np.testing.assert_allclose(fl.log_likelihood, f.log_likelihood, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# A user-written AbstractLinearGaussianSSM with inputs (regression: refused before)
# ---------------------------------------------------------------------------------------------
def test_user_subclass_with_inputs_through_kalman():
    conc, user, y, u = pair(3)
    user = eqx.tree_at(lambda m: m.B, user, jnp.array([[0.7], [-0.3]]))
    conc = eqx.tree_at(lambda m: m.transition_input_matrix, conc, jnp.array([[0.7], [-0.3]]))
    assert user.input_dim is None  # undeclared: inputs passed unchecked
    assert_tree_close(ps.kalman.smoother(user, y, inputs=u), ps.kalman.smoother(conc, y, inputs=u))
    np.testing.assert_allclose(ps.kalman.log_likelihood(user, y, inputs=u),
                               ps.kalman.filter(conc, y, inputs=u).log_likelihood, rtol=1e-12)


def test_user_subclass_em_generalised_m_step_matches_closed_form():
    conc, user, y, u = pair(4)
    n = 3
    # fixed= takes paths (old bare field names are paths too); a fixed array stays put.
    fc, hc = ps.learn.em(conc, y, n, inputs=u, fixed=("transition_offset", "emission_offset", "emission_matrix"),
                         progress=False)
    fu, hu = ps.learn.em(user, y, n, inputs=u, fixed=("H",), progress=False, m_step_iters=200)
    hu, hc = np.asarray(hu), np.asarray(hc)
    assert np.all(np.diff(hu) >= -1e-9 * np.abs(hu[1:]))
    assert hu[-1] > hu[0] + 1.0
    np.testing.assert_array_equal(np.asarray(fu.H), np.asarray(user.H))
    # The generalised M-step maximises the same expected log-likelihood as the closed form.
    np.testing.assert_allclose(hu, hc, rtol=1e-6)
    np.testing.assert_allclose(fu.F, fc.transition_matrix, atol=1e-6)
    np.testing.assert_allclose(fu.B, fc.transition_input_matrix, atol=1e-6)
    np.testing.assert_allclose(fu.R, fc.emission_cov, atol=1e-6)


def test_em_single_step_sequence_raises_instead_of_nan():
    conc, _, y, u = pair(5)
    with pytest.raises(ValueError, match="at least 2 time steps"):
        ps.learn.em(conc, y[:1], 3, inputs=u[:1], progress=False)


def test_em_short_sequence_in_batch_keeps_parameters_finite():
    conc, _, y, u = pair(5)
    fit, hist = ps.learn.em(conc, [y[:30], y[:1]], 3, inputs=[u[:30], u[:1]], progress=False)
    for leaf in jax.tree_util.tree_leaves(fit):
        assert np.all(np.isfinite(np.asarray(leaf)))
    assert np.all(np.diff(np.asarray(hist)) >= -1e-9 * np.abs(np.asarray(hist)[1:]))


def test_em_with_lengths_equals_em_on_nan_padding():
    conc, _, y, u = pair(6)
    padded = np.stack([y, np.concatenate([y[:40], np.zeros((20, 2))])])
    f1, h1 = ps.learn.em(conc, padded, 4, inputs=u, lengths=np.array([60, 40]), progress=False)
    f2, h2 = ps.learn.em(conc, [y, y[:40]], 4, inputs=[u, u[:40]], progress=False)
    np.testing.assert_allclose(h1, h2, rtol=1e-12)
    assert np.all(np.diff(np.asarray(h1)) >= -1e-9 * np.abs(np.asarray(h1)[1:]))
    # log-likelihood of the first iteration is the exact one of the two sequences
    ll = ps.kalman.filter(conc, y, inputs=u).log_likelihood + ps.kalman.filter(conc, y[:40], inputs=u[:40]) \
        .log_likelihood
    np.testing.assert_allclose(h1[0], ll, rtol=1e-12)


def test_fixed_unknown_path_raises():
    conc, user, y, u = pair(7)
    with pytest.raises(ValueError, match="fixed"):
        ps.learn.em(user, y, 2, inputs=u, fixed=("no_such",))
