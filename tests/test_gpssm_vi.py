"""Free-form VI (SGHMC particles) and the PRSSM baseline for GPSSMs (probssm.learn.gpssm_vi).

Oracles: the model's own protocol densities (initial, transition, emission log_prob) for the log
joint; EM on the equivalent linear-Gaussian SSM for the learned dynamics of a linear-kernel GPSSM,
with a tolerance from the posterior spread of the slope.
"""
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import probssm as ps
from probssm.learn.gpssm_vi import free_form_vi, gpssm_simulate, log_joint, transition_function_moments
from probssm.models.gpssm import GPSSM, AbstractInputKernel, ARDLinear, ARDSquaredExponential

TRACES = []


class CountingSE(AbstractInputKernel):
    """An SE kernel that records each trace of its gram (the body runs only while tracing)."""

    lengthscales: jax.Array = eqx.field(metadata={"constraint": ARDSquaredExponential.__dataclass_fields__[
        "lengthscales"].metadata["constraint"]})

    @property
    def input_width(self):
        return self.lengthscales.shape[0]

    def gram(self, X1, X2):
        TRACES.append(1)
        d = (X1[:, None, :] - X2[None, :, :]) / self.lengthscales
        return jnp.exp(-0.5 * jnp.sum(d * d, -1))

    def diag(self, X):
        return jnp.ones(X.shape[:1], X.dtype)


def small_model(kernel=None):
    kernel = CountingSE(jnp.ones(1)) if kernel is None else kernel
    return GPSSM(kernel, jnp.linspace(-2.0, 2.0, 4)[:, None], jnp.zeros((4, 1)), 0.1, 0.1, mean_function="zero")


def small_data(seed, T=30):
    rng = np.random.default_rng(seed)
    x = np.zeros(T)
    for t in range(1, T):
        x[t] = np.sin(2.0 * x[t - 1]) + 0.3 * rng.normal()
    return jnp.asarray((x + 0.3 * rng.normal(size=T))[:, None])


SMALL = dict(num_chains=2, sghmc_steps=2, num_warmup=5, num_samples=3, progress=False)


# ----------------------------------------------------------------------------------------------
# the log joint against the model's protocol densities; missing data
# ----------------------------------------------------------------------------------------------
def test_log_joint_equals_protocol_densities_and_drops_missing_entries():
    model = GPSSM(ARDSquaredExponential(jnp.array([0.8, 1.3]), 1.4), np.random.default_rng(0).normal(size=(5, 2)),
                  jnp.zeros((5, 1)), 0.07, 0.2, input_dim=1, initial_mean=jnp.array([0.3]),
                  initial_cov=jnp.array([[0.5]]))
    rng = np.random.default_rng(1)
    T = 5
    V, x = jnp.asarray(rng.normal(size=(5, 1))), jnp.asarray(rng.normal(size=(T, 1)))
    y, u = jnp.asarray(rng.normal(size=(T, 1))), jnp.asarray(rng.normal(size=(T, 1)))
    Z = model.inducing_inputs
    L = np.linalg.cholesky(np.asarray(model.kernel.gram(Z, Z)) + model.jitter * np.eye(5))
    m = model.with_inducing_outputs(jnp.asarray(L) @ V)
    expected = (-0.5 * float(jnp.sum(V ** 2)) - 2.5 * np.log(2 * np.pi) + float(m.initial().log_prob(x[0]))
                + sum(float(m.transition(x[t - 1], t, u[t]).log_prob(x[t])) for t in range(1, T))
                + sum(float(m.emission(x[t], t).log_prob(y[t])) for t in range(T)))
    np.testing.assert_allclose(float(log_joint(model, V, x, y, u)), expected, rtol=1e-10)
    # a NaN observation drops exactly its emission term
    y_missing = y.at[3, 0].set(jnp.nan)
    np.testing.assert_allclose(float(log_joint(model, V, x, y_missing, u)),
                               expected - float(m.emission(x[3], 3).log_prob(y[3])), rtol=1e-10)


# ----------------------------------------------------------------------------------------------
# acceptance: linear f with a linear kernel matches EM on the linear-Gaussian SSM
# ----------------------------------------------------------------------------------------------
A, Q, R, T_LIN = 0.8, 0.1, 0.1, 200


def linear_problem():
    """Data from x_t = A x_{t-1} + N(0, Q), y_t = x_t + N(0, R); EM's fit of the linear-Gaussian SSM;
    and a GPSSM whose f(x) = U x exactly (one inducing input at 1, k(x, x') = v x x': conditional
    variance 0). Shared with tests/test_gpssm_pg.py."""
    truth = ps.models.LinearGaussianSSM(jnp.zeros(1), jnp.eye(1), jnp.array([[A]]), jnp.array([[Q]]), jnp.eye(1),
                                        jnp.array([[R]]))
    _, y = ps.sample(jax.random.PRNGKey(0), truth, T_LIN)
    start = ps.models.LinearGaussianSSM(jnp.zeros(1), jnp.eye(1), jnp.array([[0.3]]), jnp.array([[0.3]]), jnp.eye(1),
                                        jnp.array([[0.3]]))
    em_fit, _ = ps.learn.em(start, y, 200, fixed=("initial_mean", "initial_cov", "emission_matrix"), progress=False)
    model = GPSSM(ARDLinear(jnp.ones(1)), jnp.ones((1, 1)), jnp.zeros((1, 1)), 0.3, 0.3, mean_function="zero",
                  jitter=1e-8)
    return y, em_fit, model


@pytest.fixture(scope="module")
def linear_fits():
    y, em_fit, model = linear_problem()
    fit, history = free_form_vi(jax.random.PRNGKey(1), model, y, 400, learning_rate=0.02, num_samples=100,
                                fixed=("initial_mean", "initial_cov", "inducing_inputs", "kernel"), progress=False)
    return em_fit, fit, history


def test_linear_kernel_gpssm_learns_the_dynamics_em_finds(linear_fits):
    """The slope of the learned mean of f (read at four points) against EM's transition coefficient.

    Tolerance: one posterior standard deviation of the slope (sd_U of the SGHMC samples, ~0.04
    here). With T = 200 the posterior mean and the MLE differ by O(1/T) (~0.005, the order of
    sd_U^2), and the Monte Carlo error of the mean of 4 chains x 100 correlated samples is
    sd_U / sqrt(ESS) with ESS >= 10, i.e. <= 0.32 sd_U; a slope off by more than sd_U is a bug. The
    noise variances get the same check at a tolerance from their own scale (25%: the
    posterior sd of a variance from 200 steps is ~sqrt(2 / 200) ~ 10% of it, and q and r trade
    off against each other)."""
    em_fit, fit, history = linear_fits
    a_em = float(em_fit.transition_matrix[0, 0])
    points = jnp.array([[-1.0], [-0.5], [0.5], [1.0]])
    moments = transition_function_moments(fit, history.inducing_outputs, points)
    slopes = np.asarray(moments.mean[:, 0] / points[:, 0])
    sd = float(jnp.std(history.inducing_outputs[:, 0, 0]))
    assert 0.01 < sd < 0.1, sd
    assert np.all(np.abs(slopes - a_em) < sd), (slopes, a_em, sd)
    # the band: a linear kernel with M = d has no within variance; the between variance is x^2 sd^2
    np.testing.assert_allclose(np.asarray(moments.variance[:, 0]), np.asarray(points[:, 0]) ** 2 * sd ** 2, rtol=1e-3)
    for gp, em in [(fit.transition_noise[0], em_fit.transition_cov[0, 0]), (fit.emission_noise[0], em_fit.emission_cov[0, 0])]:
        assert abs(float(gp) - float(em)) < 0.25 * float(em), (float(gp), float(em))
    # the fitted q(U) holds the samples' moments
    np.testing.assert_allclose(float(fit.inducing_mean[0, 0]), float(jnp.mean(history.inducing_outputs)), rtol=1e-10)


def test_objective_rises_and_history_shapes(linear_fits):
    _, fit, history = linear_fits
    obj = np.asarray(history.objective)
    assert obj.shape == (400,) and np.all(np.isfinite(obj))
    assert obj[-40:].mean() > obj[:40].mean() + 50.0, (obj[:40].mean(), obj[-40:].mean())
    assert history.inducing_outputs.shape == (400, 1, 1) and history.states.shape == (400, T_LIN, 1)


def test_kept_inducing_outputs_are_exact_draws_given_the_kept_states():
    """Each kept U is a draw from p(U | x, y, theta) for its own kept x (the Gibbs step at the end).

    Linear kernel, one inducing input at 1: f(x) = U x, so U | x is the Bayesian regression of
    x_t on x_{t-1} with prior N(0, K), K = v + jitter, and noise q + the (jitter-sized) conditional
    variance. The chains barely move (tiny SGHMC steps, no warm-up): without the redraw U would
    stay at its start (~0) and the standardised residuals below would sit near -12. With it they
    are N(0, 1): over 200 draws their mean lies within 4 / sqrt(200) of 0 and their variance
    within 4 sqrt(2 / 200) of 1."""
    y, _, model = linear_problem()
    fit, history = free_form_vi(jax.random.PRNGKey(5), model, y, 2, num_chains=4, sghmc_steps=1, num_warmup=0,
                                num_samples=50, step_size=1e-4, friction=1.0, progress=False)
    v = float(fit.kernel.variances[0])
    K = v + float(fit.jitter)
    q = float(fit.transition_noise[0])
    U = np.asarray(history.inducing_outputs[:, 0, 0])
    x = np.asarray(history.states[:, :, 0])
    prev, nxt = x[:, :-1], x[:, 1:]
    a = v * prev / K
    noise = q + v * prev ** 2 - (v * prev) ** 2 / K
    precision = 1.0 / K + np.sum(a * a / noise, axis=1)
    mean = np.sum(a * nxt / noise, axis=1) / precision
    z = (U - mean) * np.sqrt(precision)
    assert abs(z.mean()) < 4.0 / np.sqrt(z.size), z.mean()
    assert abs(z.var() - 1.0) < 4.0 * np.sqrt(2.0 / z.size), z.var()


# ----------------------------------------------------------------------------------------------
# compiled once; jit / vmap; PRSSM; missing data
# ----------------------------------------------------------------------------------------------
def test_second_call_does_not_recompile_and_vmap_over_keys():
    model = small_model()
    a = free_form_vi(jax.random.PRNGKey(0), model, small_data(0), 6, **SMALL)
    n = len(TRACES)
    assert n > 0
    b = free_form_vi(jax.random.PRNGKey(1), model, small_data(1), 6, step_size=0.03, friction=3.0,
                     learning_rate=0.05, **SMALL)
    assert len(TRACES) == n, "a second call with new data and settings of the same shapes re-traced"
    assert not np.allclose(np.asarray(a.history.objective), np.asarray(b.history.objective))
    # vmap over keys (inside the user's jit) equals the fits one by one
    y = small_data(2)
    keys = jax.random.split(jax.random.PRNGKey(3), 2)
    batched = jax.jit(jax.vmap(lambda k: free_form_vi(k, model, y, 6, **SMALL).history.objective))(keys)
    for i in range(2):
        single = free_form_vi(keys[i], model, y, 6, **SMALL).history.objective
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(single), rtol=1e-8)


def test_prssm_and_missing_observations():
    model = small_model()
    y = small_data(4)
    fit, history = free_form_vi(jax.random.PRNGKey(0), model, y, 150, method="prssm", learning_rate=0.05, **SMALL)
    obj = np.asarray(history.objective)
    assert obj[-15:].mean() > obj[:15].mean(), (obj[:15].mean(), obj[-15:].mean())
    assert history.inducing_outputs.shape == (6, 4, 1) and history.states.shape == (6, 30, 1)
    assert not np.allclose(np.asarray(fit.inducing_mean), 0.0)   # PRSSM learns q(U)
    # NaN = missing: the free-form fit runs and its states fill the gap
    y_missing = y.at[10:15].set(jnp.nan)
    fit2, h2 = free_form_vi(jax.random.PRNGKey(0), model, y_missing, 6, **SMALL)   # compiled above
    assert np.all(np.isfinite(np.asarray(h2.objective))) and np.all(np.isfinite(np.asarray(h2.states)))
    sims = gpssm_simulate(jax.random.PRNGKey(1), fit2, h2.inducing_outputs, jnp.zeros(1), 7)
    assert sims.shape == (6, 7, 1) and np.all(np.isfinite(np.asarray(sims)))


# ----------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------
def test_bad_inputs_raise_value_errors_naming_the_argument():
    model = small_model(ARDSquaredExponential(jnp.ones(1)))
    y = small_data(0, T=10)
    key = jax.random.PRNGKey(0)
    cases = [
        (dict(emissions=jnp.zeros((10, 2))), "emissions"),
        (dict(emissions=jnp.zeros(10)), "emissions"),
        (dict(emissions=jnp.full((10, 1), jnp.nan)), "emissions"),
        (dict(emissions=y.at[0, 0].set(jnp.inf)), "emissions"),
        (dict(inputs=jnp.zeros((10, 1))), "inputs"),
        (dict(num_iters=0), "num_iters"),
        (dict(step_size=0.0), "step_size"),
        (dict(step_size=-0.1), "step_size"),
        (dict(friction=-1.0), "friction"),
        (dict(step_size=0.5, friction=5.0), "friction"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(method="svi"), "method"),
        (dict(fixed=("no_such_path",)), "fixed"),
        (dict(model=ps.models.LinearGaussianSSM(jnp.zeros(1), jnp.eye(1), jnp.eye(1), jnp.eye(1), jnp.eye(1),
                                                jnp.eye(1))), "model"),
        (dict(model=eqx.tree_at(lambda m: m.transition_noise, model, jnp.array([-0.1]))), "transition_noise"),
        (dict(model=eqx.tree_at(lambda m: m.kernel.lengthscales, model, jnp.array([0.0]))), "lengthscales"),
        (dict(model=eqx.tree_at(lambda m: m.inducing_inputs, model, jnp.zeros((4, 2)))), "inducing_inputs"),
        # the q(U) factor PRSSM whitens (`GPSSM.whitened_factors`), made invalid after construction
        (dict(method="prssm", model=eqx.tree_at(lambda m: m.inducing_scale_tril, model, -model.inducing_scale_tril)),
         "inducing_scale_tril"),
    ]
    for change, name in cases:
        kwargs = dict(model=model, emissions=y, num_iters=3)
        kwargs.update(change)
        m, e, n = kwargs.pop("model"), kwargs.pop("emissions"), kwargs.pop("num_iters")
        with pytest.raises(ValueError, match=name):
            free_form_vi(key, m, e, n, progress=False, **kwargs)
    with_inputs = GPSSM(ARDSquaredExponential(jnp.ones(2)), jnp.zeros((3, 2)) + jnp.arange(3)[:, None],
                        jnp.zeros((3, 1)), 0.1, 0.1, input_dim=1)
    with pytest.raises(ValueError, match="inputs"):
        free_form_vi(key, with_inputs, y, 3)
    with pytest.raises(ValueError, match="inputs"):
        free_form_vi(key, with_inputs, y, 3, inputs=jnp.zeros((9, 1)))
    with pytest.raises(ValueError, match="points"):
        transition_function_moments(model, jnp.zeros((4, 1)), jnp.zeros((5, 2)))
    with pytest.raises(ValueError, match="inducing_outputs"):
        transition_function_moments(model, jnp.zeros((2, 3, 1)), jnp.zeros((5, 1)))
    with pytest.raises(ValueError, match="x0"):
        gpssm_simulate(key, model, jnp.zeros((4, 1)), jnp.zeros(2), 5)
    bad = eqx.tree_at(lambda m: m.transition_noise, model, jnp.array([-0.1]))
    with pytest.raises(ValueError, match="transition_noise"):
        transition_function_moments(bad, jnp.zeros((4, 1)), jnp.zeros((5, 1)))
    with pytest.raises(ValueError, match="transition_noise"):
        gpssm_simulate(key, bad, jnp.zeros((4, 1)), jnp.zeros(1), 5)


def test_function_moments_and_simulation_inside_jit_and_vmap():
    """The two read-out helpers under a user's jit and vmap equal their eager calls; the moments
    of one sample are the sparse-GP conditional (`GPSSM.conditional_moments`)."""
    model = small_model(ARDSquaredExponential(jnp.ones(1), 1.0))
    U = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 1))
    pts = jnp.linspace(-1.5, 1.5, 5)[:, None]
    eager = transition_function_moments(model, U, pts)
    jitted = jax.jit(lambda u: transition_function_moments(model, u, pts))(U)
    np.testing.assert_allclose(np.asarray(jitted.mean), np.asarray(eager.mean), rtol=1e-12)
    per_sample = jax.jit(jax.vmap(lambda u: transition_function_moments(model, u, pts).mean))(U)
    np.testing.assert_allclose(np.asarray(per_sample).mean(0), np.asarray(eager.mean), rtol=1e-10)
    cond = jax.vmap(lambda x: model.conditional_moments(x, inducing_outputs=U[0])[0])(pts)
    np.testing.assert_allclose(np.asarray(per_sample[0]), np.asarray(cond), rtol=1e-10)
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    sims = jax.jit(jax.vmap(lambda k: gpssm_simulate(k, model, U, jnp.zeros(1), 6)))(keys)
    np.testing.assert_allclose(np.asarray(sims[1]), np.asarray(gpssm_simulate(keys[1], model, U, jnp.zeros(1), 6)),
                               rtol=1e-10)
    assert sims.shape == (2, 3, 6, 1)
