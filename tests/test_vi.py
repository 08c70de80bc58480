"""ps.vi (variational engine on a linear-Gaussian prior) and ps.learn.vi, against a DENSE oracle.

The oracle below is written independently of the engine: the joint Gaussian prior of z_{0:T-1} as
one (T d)-dimensional Gaussian (from M z = c + w, M block bidiagonal), the posterior of Gaussian
sites by dense precision algebra, CVI site targets from hand-derived derivatives (Poisson closed
form; Bernoulli by Gauss-Hermite of the Price/Bonnet forms E[l'], E[l'']), Laplace as plain Newton
on z, and the ELBO as E_q[log p(y|f)] - KL(q || p) (the engine uses the site form instead).
"""
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import expit, gammaln, logsumexp

import probssm as ps
from probssm.inference import vi
from probssm.learn.vi import vi as learn_vi

T = 12
ITERS = 60


def ar1(dtype=jnp.float64, q=0.3, offset=0.5):
    return ps.models.LinearGaussianSSM(jnp.zeros(1, dtype), jnp.eye(1, dtype=dtype), 0.9 * jnp.eye(1, dtype=dtype),
                                       q * jnp.eye(1, dtype=dtype), jnp.eye(1, dtype=dtype), jnp.eye(1, dtype=dtype),
                                       emission_offset=offset * jnp.ones(1, dtype))


def lds():
    rng = np.random.default_rng(3)
    F = np.array([[0.95, 0.1], [-0.1, 0.9]])
    H = 0.5 * rng.normal(size=(5, 2))
    return ps.models.LinearGaussianSSM(jnp.array([0.2, -0.1]), 0.5 * jnp.eye(2), jnp.asarray(F),
                                       0.05 * jnp.eye(2), jnp.asarray(H), jnp.eye(5),
                                       emission_offset=jnp.asarray(rng.normal(size=5) * 0.3))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    z, _ = ps.sample(jax.random.PRNGKey(1), ar1(), T)
    f = np.asarray(z)[:, 0] + 0.5
    counts = rng.poisson(np.exp(f))[:, None].astype(float)
    labels = (rng.random(T) < expit(f))[:, None].astype(float)
    gauss = (f + 0.7 * rng.normal(size=T))[:, None]
    return dict(counts=counts, labels=labels, gauss=gauss)


# ----------------------------------------------------------------------------------------------
# The dense oracle
# ----------------------------------------------------------------------------------------------
class Dense:
    """Joint prior N(mu0, inv(J0)) of z (T d) and the linear predictor f = A z + dvec (T p)."""

    def __init__(self, model, T):
        m1, P1 = np.asarray(model.initial_mean), np.asarray(model.initial_cov)
        F, Q = np.asarray(model.transition_matrix), np.asarray(model.transition_cov)
        b = np.asarray(model.transition_offset)
        H, d = np.asarray(model.emission_matrix), np.asarray(model.emission_offset)
        n, p = m1.shape[0], H.shape[0]
        M = np.eye(T * n)
        W = np.zeros((T * n, T * n))
        c = np.zeros(T * n)
        for t in range(T):
            W[t * n:(t + 1) * n, t * n:(t + 1) * n] = P1 if t == 0 else Q
            c[t * n:(t + 1) * n] = m1 if t == 0 else b
            if t > 0:
                M[t * n:(t + 1) * n, (t - 1) * n:t * n] = -F
        self.J0 = M.T @ np.linalg.solve(W, M)
        self.mu0 = np.linalg.solve(M, c)
        self.A = np.kron(np.eye(T), H)
        self.dvec = np.tile(d, T)
        self.T, self.n, self.p = T, n, p

    def posterior(self, nat1, prec):
        """q(z) for sites nat1 (T, p), prec (T, p, p): dense precision = prior + A^T Lam A."""
        Lam = np.zeros((self.T * self.p,) * 2)
        for t in range(self.T):
            Lam[t * self.p:(t + 1) * self.p, t * self.p:(t + 1) * self.p] = prec[t]
        J = self.J0 + self.A.T @ Lam @ self.A
        h = self.J0 @ self.mu0 + self.A.T @ (nat1.ravel() - Lam @ self.dvec)
        C = np.linalg.inv(J)
        return C @ h, C

    def f_marginals(self, m, C):
        fm = (self.A @ m + self.dvec).reshape(self.T, self.p)
        fC = self.A @ C @ self.A.T
        fv = np.array([np.diag(fC[t * self.p:(t + 1) * self.p, t * self.p:(t + 1) * self.p]) for t in range(self.T)])
        return fm, fv

    def kl(self, m, C):
        P0 = np.linalg.inv(self.J0)
        r = m - self.mu0
        return 0.5 * (np.trace(self.J0 @ C) + r @ self.J0 @ r - len(m) + np.linalg.slogdet(P0)[1]
                      - np.linalg.slogdet(C)[1])

    def marginals(self, m, C):
        n = self.n
        return (m.reshape(self.T, n), np.array([C[t * n:(t + 1) * n, t * n:(t + 1) * n] for t in range(self.T)]))


X_GH, W_GH = np.polynomial.hermite_e.hermegauss(20)
W_GH = W_GH / np.sqrt(2 * np.pi)


def poisson_ell(y, m, v):
    return y * m - np.exp(m + 0.5 * v) - gammaln(y + 1)


def poisson_derivs(y, f):
    return y - np.exp(f), -np.exp(f)


def bernoulli_ell(y, m, v):
    f = m[..., None] + np.sqrt(v)[..., None] * X_GH
    return (y[..., None] * f - np.logaddexp(0, f)) @ W_GH


def bernoulli_derivs(y, f):
    s = expit(f)
    return y - s, -s * (1 - s)


def expected_derivs(derivs, y, m, v):
    """E[l'(f)], E[l''(f)] under N(m, v) by Gauss-Hermite (Price's theorem: dL/dS = E[l''] / 2)."""
    f = m[..., None] + np.sqrt(v)[..., None] * X_GH
    g, h = derivs(y[..., None], f)
    return g @ W_GH, h @ W_GH


def dense_cvi(model, y, family, iters=200, beta=1.0):
    """CVI on the dense prior for a factorised likelihood; missing entries get no site."""
    T_, p = y.shape
    D = Dense(model, T_)
    obs = ~np.isnan(y)
    yf = np.where(obs, y, 0.0)
    nat1, prec = np.zeros((T_, p)), np.zeros((T_, p, p))
    for _ in range(iters):
        m, C = D.posterior(nat1, prec)
        fm, fv = D.f_marginals(m, C)
        if family == "poisson":
            lam = np.exp(fm + 0.5 * fv)
            g, h = yf - lam, -lam
        else:
            g, h = expected_derivs(bernoulli_derivs, yf, fm, fv)
        new_prec = np.where(obs, -h, 0.0)
        new_nat1 = np.where(obs, g + new_prec * fm, 0.0)
        nat1 = (1 - beta) * nat1 + beta * new_nat1
        prec = (1 - beta) * prec + beta * np.einsum("tp,pq->tpq", new_prec, np.eye(p))
    m, C = D.posterior(nat1, prec)
    return D, m, C, dense_elbo(D, m, C, y, family)


def dense_elbo(D, m, C, y, family):
    fm, fv = D.f_marginals(m, C)
    ell = poisson_ell if family == "poisson" else bernoulli_ell
    obs = ~np.isnan(y)
    return float(np.sum(np.where(obs, ell(np.where(obs, y, 0.0), fm, fv), 0.0)) - D.kl(m, C))


def dense_laplace(model, y, family, iters=50):
    """Newton's method on log p(y | A z + d) + log N(z; mu0, inv(J0)); q = N(mode, inv(-Hessian))."""
    D = Dense(model, y.shape[0])
    obs = ~np.isnan(y).ravel()
    yf = np.where(np.isnan(y), 0.0, y).ravel()
    derivs = poisson_derivs if family == "poisson" else bernoulli_derivs
    z = D.mu0.copy()
    for _ in range(iters):
        g, h = derivs(yf, D.A @ z + D.dvec)
        g, h = np.where(obs, g, 0.0), np.where(obs, h, 0.0)
        J = D.J0 - D.A.T @ (h[:, None] * D.A)
        z = z + np.linalg.solve(J, D.A.T @ g - D.J0 @ (z - D.mu0))
    g, h = derivs(yf, D.A @ z + D.dvec)
    C = np.linalg.inv(D.J0 - D.A.T @ (np.where(obs, h, 0.0)[:, None] * D.A))
    return D, z, C, dense_elbo(D, z, C, y, family)


def assert_matches(post, oracle, tol):
    D, m, C, elbo = oracle
    means, covs = D.marginals(m, C)
    np.testing.assert_allclose(np.asarray(post.means), means, atol=tol, rtol=0)
    np.testing.assert_allclose(np.asarray(post.covs), covs, atol=tol, rtol=0)
    np.testing.assert_allclose(float(post.elbo), elbo, atol=tol * max(1.0, abs(elbo)), rtol=0)


LIKELIHOODS = {"poisson": vi.Poisson(), "bernoulli": vi.Bernoulli()}
KEYS = {"poisson": "counts", "bernoulli": "labels"}


# ----------------------------------------------------------------------------------------------
# (1) Gaussian likelihood: exact in one CVI step (and one PL step)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["cvi", "pl"])
def test_gaussian_likelihood_is_exact_in_one_step(data, method):
    y = data["gauss"]
    post = vi.fit(ar1(), vi.Gaussian(0.49), y, 1, method)
    exact_model = ps.models.LinearGaussianSSM(jnp.zeros(1), jnp.eye(1), 0.9 * jnp.eye(1), 0.3 * jnp.eye(1),
                                              jnp.eye(1), 0.49 * jnp.eye(1), emission_offset=0.5 * jnp.ones(1))
    exact = ps.kalman.smoother(exact_model, y)
    np.testing.assert_allclose(np.asarray(post.means), np.asarray(exact.smoothed_means), atol=1e-10)
    np.testing.assert_allclose(np.asarray(post.covs), np.asarray(exact.smoothed_covs), atol=1e-10)
    np.testing.assert_allclose(float(post.elbo), float(exact.log_likelihood), atol=1e-10)
    np.testing.assert_allclose(np.asarray(post.sites.precision)[:, 0, 0], 1 / 0.49, rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# (2) Poisson / Bernoulli, CVI and Laplace, against the dense oracle at convergence
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["poisson", "bernoulli"])
@pytest.mark.parametrize("method", ["cvi", "laplace"])
def test_fixed_point_equals_dense_oracle(data, family, method):
    y = data[KEYS[family]]
    post = vi.fit(ar1(), LIKELIHOODS[family], y, ITERS, method)
    oracle = dense_cvi(ar1(), y, family) if method == "cvi" else dense_laplace(ar1(), y, family)
    assert_matches(post, oracle, 1e-6)
    # f marginals are H z + d of the state marginals
    np.testing.assert_allclose(np.asarray(post.f_means), np.asarray(post.means) + 0.5, atol=1e-12)
    np.testing.assert_allclose(np.asarray(post.elbo_history[-1]), float(post.elbo), atol=0)


def test_cvi_maximises_the_elbo_over_gaussians(data):
    """CVI's fixed point is the optimal Gaussian: above Laplace's Gaussian and PL's (same bound)."""
    y = data["counts"]
    elbos = {m: float(vi.fit(ar1(), vi.Poisson(), y, ITERS, m).elbo) for m in vi.METHODS}
    assert elbos["cvi"] >= elbos["laplace"] - 1e-9 and elbos["cvi"] >= elbos["pl"] - 1e-9, elbos


# ----------------------------------------------------------------------------------------------
# (3) the ELBO is a lower bound on the importance-sampled log marginal likelihood
# ----------------------------------------------------------------------------------------------
def test_elbo_below_importance_sampled_log_marginal(data):
    y = data["counts"]
    post = vi.fit(ar1(), vi.Poisson(), y, ITERS)
    D, m, C, _ = dense_cvi(ar1(), y, "poisson", iters=ITERS)
    rng = np.random.default_rng(7)
    N = 200_000
    L = np.linalg.cholesky(C)
    z = m + rng.standard_normal((N, len(m))) @ L.T
    f = z @ D.A.T + D.dvec
    log_lik = np.sum(y[:, 0] * f - np.exp(f) - gammaln(y[:, 0] + 1), axis=1)
    r0, r = z - D.mu0, z - m
    Cinv = np.linalg.inv(C)
    log_prior = -0.5 * np.einsum("ni,ij,nj->n", r0, D.J0, r0) + 0.5 * np.linalg.slogdet(D.J0)[1]
    log_q = -0.5 * np.einsum("ni,ij,nj->n", r, Cinv, r) - 0.5 * np.linalg.slogdet(C)[1]
    log_w = log_lik + log_prior - log_q  # the (2 pi)^{-n/2} factors cancel
    log_z = logsumexp(log_w) - np.log(N)
    w = np.exp(log_w - log_w.max())
    se = np.std(w) / np.mean(w) / np.sqrt(N)  # delta-method standard error of log Z-hat
    elbo = float(post.elbo)
    assert elbo <= log_z + 4 * se, (elbo, log_z, se)
    assert log_z - elbo < 1.0  # a tight bound on this small problem, not a vacuous one


# ----------------------------------------------------------------------------------------------
# (4) step sizes
# ----------------------------------------------------------------------------------------------
def test_damped_cvi_on_poisson_increases_the_elbo_every_iteration(data):
    """Not a theorem for a fixed step size (CVI is mirror descent: monotone for steps below
    1 / smoothness); checked on this problem for beta = 0.5, and the fixed point is unchanged."""
    y = data["counts"]
    post = vi.fit(ar1(), vi.Poisson(), y, ITERS, step_size=0.5)
    history = np.asarray(post.elbo_history)
    assert np.all(np.diff(history) >= -1e-10), np.diff(history).min()
    assert_matches(post, dense_cvi(ar1(), y, "poisson"), 1e-6)
    # the damped update is the dense oracle's damped update, iteration by iteration
    few = vi.fit(ar1(), vi.Poisson(), y, ITERS, step_size=0.3)
    D, m, C, elbo = dense_cvi(ar1(), y, "poisson", iters=ITERS, beta=0.3)
    np.testing.assert_allclose(float(few.elbo), elbo, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# (5) missing data
# ----------------------------------------------------------------------------------------------
def test_missing_rows_equal_dropping_their_sites(data):
    y = data["counts"].copy()
    y[[2, 3, 9]] = np.nan
    post = vi.fit(ar1(), vi.Poisson(), y, ITERS)
    assert_matches(post, dense_cvi(ar1(), y, "poisson"), 1e-6)
    assert np.all(np.asarray(post.sites.precision)[[2, 3, 9]] == 0)
    lap = vi.fit(ar1(), vi.Poisson(), y, ITERS, "laplace")
    assert_matches(lap, dense_laplace(ar1(), y, "poisson"), 1e-6)


# ----------------------------------------------------------------------------------------------
# (6) jit / vmap / grad
# ----------------------------------------------------------------------------------------------
def test_grad_of_the_elbo_with_sites_fixed_matches_finite_differences(data):
    y = data["counts"]
    sites = vi.fit(ar1(), vi.Poisson(), y, ITERS).sites

    @jax.jit
    def value(log_q):  # diffuse=False: the prior's initial covariance is finite (one smoother form)
        return vi.elbo(ar1(q=jnp.exp(log_q)), vi.Poisson(), y, sites, diffuse=False)

    x = jnp.log(0.3)
    g = float(jax.jit(jax.grad(value))(x))
    h = 1e-5
    fd = (float(value(x + h)) - float(value(x - h))) / (2 * h)
    assert np.isfinite(g)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


def test_grad_through_fit_equals_the_exact_log_likelihood_gradient(data):
    """Differentiating the whole compiled loop: with a Gaussian likelihood one CVI step is exact, so
    d ELBO / d log(variance) is the derivative of the Kalman log-likelihood."""
    y = data["gauss"]

    def exact(log_v):
        model = ps.models.LinearGaussianSSM(jnp.zeros(1), jnp.eye(1), 0.9 * jnp.eye(1), 0.3 * jnp.eye(1),
                                            jnp.eye(1), jnp.exp(log_v) * jnp.eye(1), emission_offset=0.5 * jnp.ones(1))
        return ps.kalman.log_likelihood(model, y, diffuse=False)

    x = jnp.log(0.49)
    g = jax.grad(lambda lv: vi.fit(ar1(), vi.Gaussian(jnp.exp(lv)), y, 1).elbo)(x)
    np.testing.assert_allclose(float(g), float(jax.jit(jax.grad(exact))(x)), rtol=1e-9)


def test_fit_under_jit_and_batches_equal_single_runs(data):
    y = data["counts"]
    single = vi.fit(ar1(), vi.Poisson(), y, ITERS)
    jitted = jax.jit(lambda yy: vi.fit(ar1(), vi.Poisson(), yy, ITERS).elbo)(jnp.asarray(y))
    np.testing.assert_allclose(float(jitted), float(single.elbo), atol=1e-12)
    y2 = data["counts"][::-1].copy()
    batch = vi.fit(ar1(), vi.Poisson(), np.stack([y, y2]), ITERS)
    other = vi.fit(ar1(), vi.Poisson(), y2, ITERS)
    assert batch.means.shape == (2, T, 1) and batch.elbo_history.shape == (2, ITERS)
    np.testing.assert_allclose(np.asarray(batch.elbo), [float(single.elbo), float(other.elbo)], atol=1e-10)
    mapped = jax.vmap(lambda yy: vi.fit(ar1(), vi.Poisson(), yy, ITERS).elbo)(jnp.stack([y, y2]))
    np.testing.assert_allclose(np.asarray(mapped), np.asarray(batch.elbo), atol=1e-10)
    # warm start: the converged sites are a fixed point
    again = vi.fit(ar1(), vi.Poisson(), y, ITERS, init_sites=single.sites)
    np.testing.assert_allclose(np.asarray(again.elbo_history), float(single.elbo), atol=1e-9)


# ----------------------------------------------------------------------------------------------
# (7) hyperparameter learning
# ----------------------------------------------------------------------------------------------
def test_learn_vi_raises_the_elbo_and_moves_toward_the_truth():
    truth_q = 0.3
    z, _ = ps.sample(jax.random.PRNGKey(0), ar1(q=truth_q, offset=1.0), 150)
    y = np.random.default_rng(0).poisson(np.exp(np.asarray(z) + 1.0)).astype(float)
    start = ar1(q=0.05, offset=1.0)
    fixed = ("prior.initial_mean", "prior.initial_cov", "prior.transition_matrix", "prior.emission_matrix",
             "prior.emission_offset", "prior.emission_cov")
    prior, lik, history = learn_vi(start, vi.Poisson(), y, 60, fixed=fixed, optimizer=optax.adam(5e-2),
                                   progress=False)
    q = float(prior.transition_cov[0, 0])
    assert history[-1] > history[0] + 10, (history[0], history[-1])
    assert abs(q - truth_q) < 0.5 * abs(0.05 - truth_q), q
    assert float(start.transition_cov[0, 0]) == 0.05  # the start is untouched
    post = vi.fit(prior, lik, y, ITERS)
    assert float(post.elbo) >= float(history[-1]) - 1.0


def test_learn_vi_learns_likelihood_parameters_by_path(data):
    y = data["gauss"]
    prior, lik, history = learn_vi(ar1(), vi.Gaussian(2.0), y, 40, fixed=("prior",),
                                   optimizer=optax.adam(5e-2), progress=False)
    assert float(lik.variance) < 2.0 and history[-1] > history[0]
    np.testing.assert_array_equal(np.asarray(prior.transition_cov), np.asarray(ar1().transition_cov))
    with pytest.raises(ValueError, match="fixed"):
        learn_vi(ar1(), vi.Gaussian(2.0), y, 5, fixed=("prior", "likelihood"))
    with pytest.raises(ValueError, match="fixed"):
        learn_vi(ar1(), vi.Gaussian(2.0), y, 5, fixed=("transition_cov",))


# ----------------------------------------------------------------------------------------------
# (8) Poisson LDS: 2-d latent, 5 neurons, partly missing rows
# ----------------------------------------------------------------------------------------------
def test_poisson_lds_equals_dense_oracle_with_partly_missing_rows():
    model = lds()
    z, _ = ps.sample(jax.random.PRNGKey(4), model, T)
    f = np.asarray(z) @ np.asarray(model.emission_matrix).T + np.asarray(model.emission_offset)
    y = np.random.default_rng(5).poisson(np.exp(f)).astype(float)
    y[4] = np.nan
    y[7, [0, 3]] = np.nan
    post = vi.fit(model, vi.Poisson(), y, ITERS)
    assert post.f_means.shape == (T, 5) and post.covs.shape == (T, 2, 2)
    assert_matches(post, dense_cvi(model, y, "poisson"), 1e-6)
    prec = np.asarray(post.sites.precision)
    assert np.all(prec[4] == 0) and np.all(prec[7][[0, 3]] == 0) and np.all(prec[7][:, [0, 3]] == 0)


def test_inputs_reach_the_prior():
    """A prior that reads inputs (D u_t folded into d_t) equals one with that offset written out."""
    rng = np.random.default_rng(2)
    u = rng.normal(size=(T, 1))
    Dm = np.array([[0.7]])
    with_inputs = ps.models.LinearGaussianSSM(jnp.zeros(1), jnp.eye(1), 0.9 * jnp.eye(1), 0.3 * jnp.eye(1),
                                              jnp.eye(1), jnp.eye(1), emission_offset=0.5 * jnp.ones(1),
                                              emission_input_matrix=jnp.asarray(Dm))
    written = ps.models.LinearGaussianSSM(jnp.zeros(1), jnp.eye(1), 0.9 * jnp.eye(1), 0.3 * jnp.eye(1),
                                          jnp.eye(1), jnp.eye(1), emission_offset=jnp.asarray(0.5 + u @ Dm.T))
    y = rng.poisson(2.0, size=(T, 1)).astype(float)
    a = vi.fit(with_inputs, vi.Poisson(), y, ITERS, inputs=u)
    b = vi.fit(written, vi.Poisson(), y, ITERS)
    np.testing.assert_allclose(float(a.elbo), float(b.elbo), atol=1e-10)
    with pytest.raises(ValueError, match="inputs"):
        vi.fit(with_inputs, vi.Poisson(), y, ITERS)


# ----------------------------------------------------------------------------------------------
# Closed forms against the quadrature of a user Likelihood(fn); the other families run
# ----------------------------------------------------------------------------------------------
def test_closed_forms_equal_gauss_hermite_of_a_user_likelihood(data):
    import numpyro.distributions as dist

    y = data["counts"]
    traces = []

    def poisson(f):
        if isinstance(f, jax.core.Tracer):
            traces.append(1)
        return dist.Poisson(jnp.exp(f))

    user_lik = vi.Likelihood(poisson)
    user = vi.fit(ar1(), user_lik, y, ITERS)
    closed = vi.fit(ar1(), vi.Poisson(), y, ITERS)
    np.testing.assert_allclose(float(user.elbo), float(closed.elbo), atol=1e-8)
    np.testing.assert_allclose(np.asarray(user.means), np.asarray(closed.means), atol=1e-8)
    # compiled once per shape: new data, a new prior object and a new step size do not retrace
    count = len(traces)
    vi.fit(ar1(q=0.2), user_lik, y[::-1] + 1, ITERS, step_size=0.7)
    assert len(traces) == count
    # heteroscedastic Gaussian: closed form vs a 2-d tensor-product rule
    rng = np.random.default_rng(1)
    prior2 = ps.models.LinearGaussianSSM(jnp.zeros(2), 0.5 * jnp.eye(2), 0.9 * jnp.eye(2), 0.1 * jnp.eye(2),
                                         jnp.eye(2), jnp.eye(2), emission_offset=jnp.array([0.0, -0.5]))
    yh = rng.normal(size=(T, 1))
    yh[5] = np.nan
    hetero = vi.HeteroscedasticGaussian()
    quad = vi.Likelihood(lambda f: dist.Normal(f[0], jnp.exp(f[1])), latent_dim=2)
    sites = vi.fit(prior2, hetero, yh, ITERS, step_size=0.5).sites
    assert np.all(np.asarray(sites.precision)[5] == 0)

    @jax.jit
    def both(s):
        return [(vi.elbo(prior2, lik, yh, s, diffuse=False), vi.update_sites(prior2, lik, yh, s, diffuse=False))
                for lik in (hetero, quad)]

    (e1, s1), (e2, s2) = both(sites)
    np.testing.assert_allclose(float(e1), float(e2), atol=1e-9)
    for a, b in zip(s1, s2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-8)


def test_other_families_and_posterior_linearisation_run(data):
    rng = np.random.default_rng(3)
    cases = [(vi.StudentT(3.0, 0.5), data["gauss"], "cvi"), (vi.Gamma(2.0), rng.gamma(2.0, 1.0, size=(T, 1)), "pl")]
    for lik, y, method in cases:
        post = vi.fit(ar1(), lik, y, ITERS, method, step_size=0.5)
        assert np.isfinite(np.asarray(post.elbo_history)).all(), (lik, method)
    # PL on Poisson sits close to CVI (same bound, a different Gaussian)
    pl = vi.fit(ar1(), vi.Poisson(), data["counts"], ITERS, "pl")
    cvi = vi.fit(ar1(), vi.Poisson(), data["counts"], ITERS)
    np.testing.assert_allclose(np.asarray(pl.means), np.asarray(cvi.means), atol=0.1)


# ----------------------------------------------------------------------------------------------
# (9) bad inputs
# ----------------------------------------------------------------------------------------------
def test_bad_inputs_name_the_argument(data):
    y = data["counts"]
    hmm = ps.models.HMM(jnp.ones(2) / 2, 0.5 * jnp.ones((2, 2)), ps.emissions.Poisson(jnp.ones((2, 1))))
    cases = [
        (lambda: vi.fit(hmm, vi.Poisson(), y, 5), "prior"),
        (lambda: vi.fit(ar1(), "poisson", y, 5), "likelihood"),
        (lambda: vi.fit(ar1(), vi.Poisson(), np.zeros((2, 2, 2, 1)), 5), r"y: expected shape \(T, 1\)"),
        (lambda: vi.fit(ar1(), vi.Poisson(), np.zeros((T, 3)), 5), r"y: expected shape \(T, 1\)"),
        (lambda: vi.fit(ar1(), vi.HeteroscedasticGaussian(), y, 5), "y: expected shape"),
        (lambda: vi.fit(ar1(), vi.Poisson(), y, 0), "num_iters"),
        (lambda: vi.fit(ar1(), vi.Poisson(), y, 5, step_size=0.0), "step_size"),
        (lambda: vi.fit(ar1(), vi.Poisson(), y, 5, step_size=1.5), "step_size"),
        (lambda: vi.fit(ar1(), vi.Poisson(), y, 5, method="newton"), "method"),
        (lambda: vi.fit(ar1(), vi.Poisson(), -y - 1, 5), "y: expected non-negative integer"),
        (lambda: vi.fit(ar1(), vi.Poisson(), y + 0.5, 5), "y: expected non-negative integer"),
        (lambda: vi.fit(ar1(), vi.Bernoulli(), 2 * np.ones((T, 1)), 5), "y: expected values in"),
        (lambda: vi.fit(ar1(), vi.Gamma(1.0), np.zeros((T, 1)), 5), "y: expected positive"),
        (lambda: vi.fit(ar1(), vi.Poisson(), np.full((T, 1), np.inf), 5), "y: found inf"),
        (lambda: vi.fit(ar1(), vi.Poisson(), y, 5, init_sites=vi.Sites(np.zeros(T), np.zeros(T))), "init_sites"),
        (lambda: vi.StudentT(df=-1.0), "df"),
        (lambda: vi.Poisson(exposure=0.0), "exposure"),
        (lambda: learn_vi(ar1(), vi.Poisson(), y, 0), "num_iters"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


# ----------------------------------------------------------------------------------------------
# (10) float32 on a long sequence
# ----------------------------------------------------------------------------------------------
def test_float32_long_sequence_is_close_to_float64():
    n = 2000
    z, _ = ps.sample(jax.random.PRNGKey(9), ar1(), n)
    y = np.random.default_rng(9).poisson(np.exp(np.asarray(z) + 0.5)).astype(float)
    start = time.perf_counter()
    p64 = vi.fit(ar1(), vi.Poisson(), y, 30)
    p32 = vi.fit(ar1(jnp.float32), vi.Poisson(), y.astype(np.float32), 30)
    assert p32.means.dtype == jnp.float32 and np.isfinite(np.asarray(p32.elbo_history)).all()
    np.testing.assert_allclose(np.asarray(p32.means), np.asarray(p64.means), atol=2e-3)
    np.testing.assert_allclose(np.asarray(p32.covs), np.asarray(p64.covs), atol=2e-3)
    np.testing.assert_allclose(float(p32.elbo), float(p64.elbo), rtol=1e-4)
    assert time.perf_counter() - start < 60


# ----------------------------------------------------------------------------------------------
# A Markovian GP prior (observation times as inputs) against dense GP algebra
# ----------------------------------------------------------------------------------------------
def test_markovian_gp_classification_equals_dense_gp_cvi():
    MarkovianGP = getattr(ps.models, "MarkovianGP", None)
    if MarkovianGP is None:
        pytest.skip("ps.models.MarkovianGP is not available yet")
    kernel = ps.models.kernels.Matern32(lengthscale=1.5, variance=2.0)
    gp = MarkovianGP(kernel, noise_variance=0.1)
    rng = np.random.default_rng(11)
    t = np.sort(rng.uniform(0, 10, size=T))
    y = (rng.random(T) < expit(np.sin(t))).astype(float)[:, None]
    y[6] = np.nan
    post = vi.fit(gp, vi.Bernoulli(), y, ITERS, inputs=t[:, None])
    K = np.asarray(kernel(t[:, None], t[None, :]))
    Kinv = np.linalg.inv(K)
    obs = ~np.isnan(y[:, 0])
    yf = np.where(obs, y[:, 0], 0.0)
    nat1, prec = np.zeros(T), np.zeros(T)
    for _ in range(ITERS):
        C = np.linalg.inv(Kinv + np.diag(prec))
        m = C @ nat1
        g, h = expected_derivs(bernoulli_derivs, yf, m, np.diag(C))
        prec, nat1 = np.where(obs, -h, 0.0), np.where(obs, g - h * m, 0.0)
    C = np.linalg.inv(Kinv + np.diag(prec))
    m = C @ nat1
    kl = 0.5 * (np.trace(Kinv @ C) + m @ Kinv @ m - T + np.linalg.slogdet(K)[1] - np.linalg.slogdet(C)[1])
    elbo = np.sum(np.where(obs, bernoulli_ell(yf, m, np.diag(C)), 0.0)) - kl
    np.testing.assert_allclose(np.asarray(post.f_means)[:, 0], m, atol=1e-6)
    np.testing.assert_allclose(np.asarray(post.f_covs)[:, 0, 0], np.diag(C), atol=1e-6)
    np.testing.assert_allclose(float(post.elbo), elbo, atol=1e-6)


@pytest.mark.parametrize("make, field", [
    (lambda: vi.StudentT(3.0, 1.0), "df"), (lambda: vi.Gaussian(1.0), "variance"), (lambda: vi.Gamma(2.0), "shape"),
])
def test_tree_at_likelihood_with_a_bad_value_is_named(make, field):
    """A likelihood made by eqx.tree_at skips its constructor; fit and ps.learn.vi still name the field."""
    prior = ps.models.LinearGaussianSSM(jnp.zeros(1), jnp.eye(1), 0.9 * jnp.eye(1), 0.1 * jnp.eye(1), jnp.eye(1),
                                        jnp.eye(1))
    bad = eqx.tree_at(lambda lik: getattr(lik, field), make(), -1.0)
    y = jnp.ones((6, 1))
    with pytest.raises(ValueError, match=rf"^likelihood\.{field}"):
        vi.fit(prior, bad, y, 2)
    with pytest.raises(ValueError, match=rf"^likelihood\.{field}"):
        ps.learn.vi(prior, bad, y, 2, progress=False)
