"""Particle-Gibbs learning of a GPSSM's transition function (`ps.learn.gpssm_particle_gibbs`).

Oracles: EM on the equivalent linear-Gaussian SSM for a linear-kernel GPSSM (tolerance from the
posterior spread of the slope), and the kink function itself (acceptance: RMSE <= 0.3).
"""
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import probssm as ps
from probssm.models.gpssm import GPSSM, ARDSquaredExponential
from test_gpssm_vi import linear_problem

T_LIN = 200  # the length of test_gpssm_vi.linear_problem's data


@pytest.fixture(scope="module")
def linear_fits():
    y, em_fit, model = linear_problem()
    fit, history = ps.learn.gpssm_particle_gibbs(jax.random.PRNGKey(1), model, y, 400, num_particles=16,
                                                 num_samples=300, learning_rate=0.02,
                                                 fixed=("initial_mean", "initial_cov", "inducing_inputs", "kernel"),
                                                 progress=False)
    return em_fit, fit, history, y


def test_linear_kernel_particle_gibbs_learns_the_dynamics_em_finds(linear_fits):
    """The slope of the learned f against EM's transition coefficient, within one posterior
    standard deviation of the slope (sd of the U draws, ~0.04; the posterior mean and the MLE differ
    by O(1/T), and the Monte Carlo error of the mean of 300 correlated draws with an effective size
    >= 10 is <= 0.32 sd). The noise variances within 25% (their posterior sd from 200 steps is ~10%,
    and q and r trade off)."""
    em_fit, fit, history, _ = linear_fits
    a_em = float(em_fit.transition_matrix[0, 0])
    points = jnp.array([[-1.0], [0.5], [1.0]])
    moments = ps.learn.transition_function_moments(fit, history.inducing_outputs, points)
    slopes = np.asarray(moments.mean[:, 0] / points[:, 0])
    sd = float(jnp.std(history.inducing_outputs[:, 0, 0]))
    assert 0.01 < sd < 0.1, sd
    assert np.all(np.abs(slopes - a_em) < sd), (slopes, a_em, sd)
    for gp, em in [(fit.transition_noise[0], em_fit.transition_cov[0, 0]), (fit.emission_noise[0], em_fit.emission_cov[0, 0])]:
        assert abs(float(gp) - float(em)) < 0.25 * float(em), (float(gp), float(em))
    assert history.inducing_outputs.shape == (300, 1, 1) and history.states.shape == (300, T_LIN, 1)
    obj = np.asarray(history.objective)
    assert obj.shape == (400,) and obj[-40:].mean() > obj[:40].mean() + 50.0
    # the chain moves: the kept state paths are not all the same
    assert float(jnp.std(history.states[:, 50, 0])) > 0.01


def kink(x):
    return 0.8 + (x + 0.2) * (1.0 - 5.0 / (1.0 + np.exp(-2.0 * x)))


def kink_data(T=120):
    """examples/gpssm_kink.py's data (seed 0)."""
    rng = np.random.default_rng(0)
    x = np.zeros(T)
    x[0] = rng.normal()
    for t in range(1, T):
        x[t] = kink(x[t - 1]) + np.sqrt(0.05) * rng.normal()
    return (x + np.sqrt(0.1) * rng.normal(size=T))[:, None]


@pytest.mark.slow
def test_particle_gibbs_recovers_the_kink():
    # examples/gpssm_kink.py's data and settings; measured RMSE 0.138, band 100%
    M = 16
    y = kink_data()
    Z = jnp.linspace(float(y.min()) - 0.5, float(y.max()) + 0.5, M)[:, None]
    start = GPSSM(ARDSquaredExponential(jnp.ones(1), 1.0), Z, jnp.zeros((M, 1)), 0.1, 0.2, mean_function="zero")
    fit, history = ps.learn.gpssm_particle_gibbs(jax.random.PRNGKey(1), start, y, 1500, num_particles=32,
                                                 num_samples=500, fixed=("emission_offset", "initial_mean",
                                                                         "initial_cov"), progress=False)
    grid = np.linspace(-3.0, 1.0, 200)
    fm = ps.learn.transition_function_moments(fit, history.inducing_outputs, jnp.asarray(grid)[:, None])
    rmse = float(np.sqrt(np.mean((np.asarray(fm.mean[:, 0]) - kink(grid)) ** 2)))
    assert rmse < 0.3, rmse


@pytest.mark.slow
def test_neural_ssm_by_ppg_recovers_the_kink():
    # examples/gpssm_kink.py's neural SSM: measured RMSE 0.192 (70 s)
    import optax

    y = kink_data()
    model = ps.models.NeuralSSM(jax.random.PRNGKey(0), 1, 0.1, 0.2, width_size=32, depth=2, residual=False)
    fit, _ = ps.learn.mle(model, y, 1000, estimator="ppg", key=jax.random.PRNGKey(1), num_particles=100,
                          optimizer=optax.adam(1e-2), fixed=("emission_offset", "initial_mean", "initial_cov"),
                          progress=False)
    grid = np.linspace(-3.0, 1.0, 200)
    f = np.asarray(jax.vmap(lambda x: fit.network(x[None]))(jnp.asarray(grid))[:, 0])
    rmse = float(np.sqrt(np.mean((f - kink(grid)) ** 2)))
    assert rmse < 0.3, rmse


def small():
    model = GPSSM(ARDSquaredExponential(jnp.ones(1), 1.0), jnp.linspace(-2.0, 2.0, 4)[:, None], jnp.zeros((4, 1)),
                  0.1, 0.1, mean_function="zero")
    rng = np.random.default_rng(3)
    x = np.zeros(20)
    for t in range(1, 20):
        x[t] = np.sin(2.0 * x[t - 1]) + 0.3 * rng.normal()
    return model, jnp.asarray((x + 0.3 * rng.normal(size=20))[:, None])


def test_particle_gibbs_under_jit_and_vmap_and_with_missing_data():
    model, y = small()
    y = y.at[4, 0].set(jnp.nan)

    def fit(key):
        f, h = ps.learn.gpssm_particle_gibbs(key, model, y, 5, num_particles=4, num_samples=3, progress=False)
        return f.transition_noise, h.objective

    keys = jax.random.split(jax.random.PRNGKey(2), 2)
    q, obj = jax.jit(jax.vmap(fit))(keys)
    assert q.shape == (2, 1) and obj.shape == (2, 5) and np.all(np.isfinite(obj))
    q1, obj1 = fit(keys[1])
    np.testing.assert_allclose(q[1], q1, rtol=1e-10)
    np.testing.assert_allclose(obj[1], obj1, rtol=1e-10)


def test_particle_gibbs_bad_input():
    model, y = small()
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="num_particles"):
        ps.learn.gpssm_particle_gibbs(key, model, y, 3, num_particles=1)
    with pytest.raises(ValueError, match="learning_rate"):
        ps.learn.gpssm_particle_gibbs(key, model, y, 3, learning_rate=0.0)
    with pytest.raises(ValueError, match="fixed"):
        ps.learn.gpssm_particle_gibbs(key, model, y, 3, fixed=("nope",))
    with pytest.raises(ValueError, match="emissions"):
        ps.learn.gpssm_particle_gibbs(key, model, y[:, :, None], 3)
    bad = eqx.tree_at(lambda m: m.transition_noise, model, -model.transition_noise)
    with pytest.raises(ValueError, match="transition_noise"):
        ps.learn.gpssm_particle_gibbs(key, bad, y, 3)


# ----------------------------------------------------------------------------------------------
# the collapsed variant of free-form VI (U integrated out of the SGHMC target)
# ----------------------------------------------------------------------------------------------
def test_collapsed_log_joint_integrates_u_out():
    from probssm.learn.gpssm_vi import collapsed_log_joint, log_joint

    rng = np.random.default_rng(4)
    T = 6
    x, y, u = (jnp.asarray(rng.normal(size=(T, 1))) for _ in range(3))
    # M = 1: the integral over the whitened V of exp(log p(y, x, V)) by quadrature on a fine grid
    model = GPSSM(ARDSquaredExponential(jnp.array([0.9, 1.2]), 1.3), jnp.array([[0.2, -0.1]]), jnp.zeros((1, 1)),
                  0.07, 0.2, input_dim=1)
    grid = jnp.linspace(-12.0, 12.0, 48001)
    vals = jax.vmap(lambda v: log_joint(model, jnp.reshape(v, (1, 1)), x, y, u))(grid)
    log_integral = float(jax.scipy.special.logsumexp(vals) + jnp.log(grid[1] - grid[0]))
    np.testing.assert_allclose(float(collapsed_log_joint(model, x, y, u)), log_integral, rtol=1e-9)
    # M = 4, two outputs: the transitions' dense Gaussian, N(r_j; 0, K_xZ K_ZZ^-1 K_Zx + diag(within) + q_j I)
    model = GPSSM(ARDSquaredExponential(jnp.ones(2), 0.8), jnp.asarray(rng.normal(size=(4, 2))), jnp.zeros((4, 2)),
                  jnp.array([0.05, 0.2]), 0.3, jitter=1e-8)
    x = jnp.asarray(rng.normal(size=(T, 2)))
    y = jnp.asarray(rng.normal(size=(T, 1)))
    Z = np.asarray(model.inducing_inputs)
    X = np.asarray(x[:-1])
    Kzz = np.asarray(model.kernel.gram(Z, Z)) + 1e-8 * np.eye(4)
    Kxz = np.asarray(model.kernel.gram(X, Z))
    Qxx = Kxz @ np.linalg.solve(Kzz, Kxz.T)
    within = np.asarray(model.kernel.diag(X)) - np.diag(Qxx)
    trans = 0.0
    for j, q in enumerate([0.05, 0.2]):
        r = np.asarray(x[1:, j] - x[:-1, j])  # identity mean function
        C = Qxx + np.diag(within + q)
        trans += -0.5 * (r @ np.linalg.solve(C, r) + np.linalg.slogdet(2 * np.pi * C)[1])
    rest = (float(model.initial().log_prob(x[0]))
            + sum(float(model.emission(x[t], t).log_prob(y[t])) for t in range(T)))
    np.testing.assert_allclose(float(collapsed_log_joint(model, x, y, None)), trans + rest, rtol=1e-10)


def test_collapsed_free_form_vi_learns_the_linear_dynamics_em_finds(linear_fits):
    em_fit, _, _, y = linear_fits
    model = linear_problem()[2]
    fit, history = ps.learn.free_form_vi(jax.random.PRNGKey(1), model, y, 400, method="collapsed", learning_rate=0.02,
                                         num_samples=100,
                                         fixed=("initial_mean", "initial_cov", "inducing_inputs", "kernel"),
                                         progress=False)
    a_em = float(em_fit.transition_matrix[0, 0])
    slope = float(jnp.mean(history.inducing_outputs[:, 0, 0]))
    sd = float(jnp.std(history.inducing_outputs[:, 0, 0]))  # posterior sd of the slope (same tolerance as above)
    assert 0.01 < sd < 0.1 and abs(slope - a_em) < sd, (slope, a_em, sd)
    assert abs(float(fit.transition_noise[0]) - float(em_fit.transition_cov[0, 0])) < 0.25 * float(
        em_fit.transition_cov[0, 0])
    assert history.inducing_outputs.shape == (400, 1, 1)  # 4 chains x 100 kept rounds, U drawn given each x


def test_initial_states_start_the_chains():
    # the default start is x = C^+ (y - d) = y here (C = 1, d = 0): passing it gives the same fit
    model, y = small()
    # (free_form_vi shares `_initial_states` with it; its argument check is tested below)
    def fit(**kw):
        return ps.learn.gpssm_particle_gibbs(jax.random.PRNGKey(3), model, y, 4, num_particles=4, num_samples=2,
                                             progress=False, **kw)

    a, b = fit(), fit(initial_states=y)
    np.testing.assert_allclose(b.history.objective, a.history.objective, rtol=1e-12)
    c = fit(initial_states=y + 1.0)
    assert not np.allclose(c.history.objective, a.history.objective)
    with pytest.raises(ValueError, match="initial_states"):
        ps.learn.gpssm_particle_gibbs(jax.random.PRNGKey(3), model, y, 4, initial_states=y[:-1])
    with pytest.raises(ValueError, match="initial_states"):
        ps.learn.free_form_vi(jax.random.PRNGKey(3), model, y, 4, initial_states=y.at[0, 0].set(jnp.nan))


# ----------------------------------------------------------------------------------------------
# the linear mean function f(x, u) = A [x; u] + b + g(x, u)
# ----------------------------------------------------------------------------------------------
def test_linear_mean_function_matches_the_protocol_and_reduces_to_identity():
    from probssm.learn.gpssm_vi import collapsed_log_joint, log_joint

    rng = np.random.default_rng(5)
    T, M = 6, 5
    kern = ARDSquaredExponential(jnp.array([0.8, 1.1, 1.3]), 1.2)
    Z = jnp.asarray(rng.normal(size=(M, 3)))
    common = dict(input_dim=1, initial_mean=jnp.array([0.2, -0.1]))
    V, x = jnp.asarray(rng.normal(size=(M, 2))), jnp.asarray(rng.normal(size=(T, 2)))
    y, u = jnp.asarray(rng.normal(size=(T, 1))), jnp.asarray(rng.normal(size=(T, 1)))
    ident = GPSSM(kern, Z, jnp.zeros((M, 2)), 0.07, 0.2, **common)
    lin0 = GPSSM(kern, Z, jnp.zeros((M, 2)), 0.07, 0.2, mean_function="linear", **common)  # A = [I 0], b = 0
    for fn in (lambda m: log_joint(m, V, x, y, u), lambda m: collapsed_log_joint(m, x, y, u)):
        np.testing.assert_allclose(float(fn(lin0)), float(fn(ident)), rtol=1e-12)
    A, b = jnp.asarray(rng.normal(size=(2, 3))), jnp.asarray(rng.normal(size=2))
    lin = GPSSM(kern, Z, jnp.zeros((M, 2)), 0.07, 0.2, mean_function="linear", mean_weights=A, mean_offset=b,
                **common)
    L = np.linalg.cholesky(np.asarray(kern.gram(Z, Z)) + lin.jitter * np.eye(M))
    m = lin.with_inducing_outputs(jnp.asarray(L) @ V)
    expected = (-0.5 * float(jnp.sum(V ** 2)) - 0.5 * V.size * np.log(2 * np.pi) + float(m.initial().log_prob(x[0]))
                + sum(float(m.transition(x[t - 1], t, u[t]).log_prob(x[t])) for t in range(1, T))
                + sum(float(m.emission(x[t], t).log_prob(y[t])) for t in range(T)))
    np.testing.assert_allclose(float(log_joint(lin, V, x, y, u)), expected, rtol=1e-10)
    # the mean itself: A [x; u] + b plus the GP conditional mean
    mean, _ = lin.conditional_moments(x[0], u[1], jnp.zeros((M, 2)))
    np.testing.assert_allclose(mean, A @ jnp.concatenate([x[0], u[1]]) + b, rtol=1e-12)
    with pytest.raises(ValueError, match="mean_weights"):
        GPSSM(kern, Z, jnp.zeros((M, 2)), 0.07, 0.2, mean_weights=A, **common)
    bad = eqx.tree_at(lambda mm: mm.mean_weights, lin, A[:, :2])
    with pytest.raises(ValueError, match="mean_weights"):
        ps.learn.gpssm_particle_gibbs(jax.random.PRNGKey(0), bad, y, 2, inputs=u)


def test_collapsed_under_jit_and_vmap_and_a_bad_tree_at_model():
    model, y = small()
    kw = dict(method="collapsed", num_chains=2, sghmc_steps=2, num_warmup=2, num_samples=2, progress=False)

    def fit(key):
        return ps.learn.free_form_vi(key, model, y, 3, **kw).history.objective

    keys = jax.random.split(jax.random.PRNGKey(4), 2)
    obj = jax.jit(jax.vmap(fit))(keys)
    assert obj.shape == (2, 3) and np.all(np.isfinite(obj))
    np.testing.assert_allclose(obj[1], fit(keys[1]), rtol=1e-10)
    bad = eqx.tree_at(lambda m: m.emission_noise, model, -model.emission_noise)
    with pytest.raises(ValueError, match="emission_noise"):
        ps.learn.free_form_vi(jax.random.PRNGKey(0), bad, y, 3, **kw)
