"""Markovian GP-VAE: the Kalman-smoothed sites against dense GP regression, the ELBO against its
closed form log p(y) - KL(q || p(z | y)), and the fit / checks of the public functions."""
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import probssm as ps
from probssm.inference import gpvae as G
from probssm.learn import gpvae as LG
from probssm.models import gpvae as M

NOISE = np.array([0.3, 0.5])  # site variances V~ (one per latent dimension)
MISSING = 5  # index of the missing frame


class Sites(eqx.Module):
    """Encoder with sites y~_t = y_t + shift and V~_t = exp(log_var): the identity-style encoder."""

    shift: jax.Array
    log_var: jax.Array

    def __call__(self, y):
        return y + self.shift, self.log_var


class Identity(eqx.Module):
    """Decoder z -> z (D = L)."""

    def __call__(self, z):
        return z


def _times(T=14, seed=0):
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.uniform(0.1, 1.0, T))  # irregular, sorted, distinct


def _data(t, seed=1):
    y = np.random.default_rng(seed).normal(size=(t.shape[0], 2))
    y[MISSING] = np.nan
    return y


KERNEL_SETS = {
    "mixed": lambda: (ps.gp.Matern32(lengthscale=1.3, variance=0.8), ps.gp.Matern52(lengthscale=0.7, variance=1.5)),
    "stacked": lambda: (ps.gp.Matern32(lengthscale=1.3, variance=0.8), ps.gp.Matern32(lengthscale=0.6, variance=1.7)),
}


def _model(kernels, shift=0.0, site_scale=1.0, obs_var=NOISE):
    enc = Sites(jnp.full(2, shift), jnp.log(jnp.asarray(site_scale * NOISE)))
    return M.MarkovianGPVAE(kernels, enc, Identity(), observation_variance=jnp.asarray(obs_var))


# ---------------------------------------------------------------------------------------------
# Dense oracle: GP regression per latent dimension on the observed frames, exact kernels
# ---------------------------------------------------------------------------------------------
def _gram(k, a, b):
    return np.asarray(k(jnp.asarray(a)[:, None], jnp.asarray(b)[None, :]))


def _dense(kernels, t, y, noise, t_star):
    """Per latent dim l: log N(y_o; 0, K_oo + noise_l I), posterior mean / var at t_star, and the
    posterior mean / covariance at the observed times."""
    obs = ~np.isnan(y).any(axis=1)
    to = t[obs]
    out = []
    for l, k in enumerate(kernels):
        yo = y[obs, l]
        S = _gram(k, to, to) + noise[l] * np.eye(to.size)
        C = np.linalg.cholesky(S)
        alpha = np.linalg.solve(C.T, np.linalg.solve(C, yo))
        lml = -0.5 * yo @ alpha - np.log(np.diag(C)).sum() - 0.5 * to.size * np.log(2 * np.pi)
        Ks = _gram(k, t_star, to)
        mean = Ks @ alpha
        W = np.linalg.solve(C, Ks.T)
        var = np.diag(_gram(k, t_star, t_star)) - np.sum(W ** 2, axis=0)
        Koo = _gram(k, to, to)
        Wo = np.linalg.solve(C, Koo)
        out.append(dict(lml=lml, mean=mean, var=var, mean_o=Koo @ alpha, cov_o=Koo - Wo.T @ Wo))
    return out


def _kl(m1, S1, m2, S2):
    """KL(N(m1, S1) || N(m2, S2))."""
    C2 = np.linalg.cholesky(S2)
    A = np.linalg.solve(C2, S1)
    tr = np.trace(np.linalg.solve(C2.T, A))
    d = np.linalg.solve(C2, m2 - m1)
    logdet1 = np.linalg.slogdet(S1)[1]
    return 0.5 * (tr + d @ d - m1.size + 2 * np.log(np.diag(C2)).sum() - logdet1)


# ---------------------------------------------------------------------------------------------
# (1) log Z and (2) q(z) against dense GP regression
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(KERNEL_SETS))
def test_log_normaliser_and_posterior_match_dense_gp(kind):
    """Sites y~ = y, V~ = NOISE: log Z is the GP marginal likelihood of y with noise NOISE and q(z)
    the GP posterior (dense Cholesky oracle, exact kernels), irregular times, one missing frame.
    "mixed" kernels run one smoother each, "stacked" ones share a vmapped smoother."""
    kernels = KERNEL_SETS[kind]()
    t = _times()
    y = _data(t)
    vae = _model(kernels)
    t_new = np.array([-0.5, 0.37, t[3], 4.123, t[-1] + 1.5])
    dense = _dense(kernels, t, y, NOISE, np.concatenate([t, t_new]))
    T = t.size

    post = G.posterior(vae, t, y)
    lml = sum(d["lml"] for d in dense)
    np.testing.assert_allclose(post.log_normaliser, lml, rtol=1e-10, atol=1e-8)
    np.testing.assert_allclose(post.means, np.stack([d["mean"][:T] for d in dense], 1), atol=1e-8)
    np.testing.assert_allclose(post.variances, np.stack([d["var"][:T] for d in dense], 1), atol=1e-8)
    if kind == "stacked":
        return
    # identity decoder: the imputed frames are the posterior means, the missing frame included
    np.testing.assert_allclose(G.impute(vae, t, y), post.means, atol=1e-12)
    pred = G.predict(vae, t, y, t_new)
    np.testing.assert_allclose(pred.means, np.stack([d["mean"][T:] for d in dense], 1), atol=1e-8)
    np.testing.assert_allclose(pred.variances, np.stack([d["var"][T:] for d in dense], 1), atol=1e-8)
    np.testing.assert_allclose(pred.decoded, pred.means, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# (3) the ELBO: closed form log p(y) - KL(q || p(z | y)); equality for the exact sites
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift,site_scale", [(0.0, 1.0), (0.25, 2.0)])
def test_elbo_equals_log_evidence_minus_kl(shift, site_scale):
    """Identity decoder, Gaussian likelihood with variance NOISE: p(y) is GP regression with noise
    NOISE, and ELBO = log p(y) - KL(q || p(z | y)). q / p(z | y) depends on z only through the
    observed frames, so the KL is that of the dense posteriors of f at the observed times. With
    sites y~ = y and V~ = NOISE, q is the exact posterior and ELBO = log p(y)."""
    kernels = KERNEL_SETS["mixed"]()
    t = _times()
    y = _data(t)
    obs = ~np.isnan(y).any(axis=1)
    vae = _model(kernels, shift=shift, site_scale=site_scale)
    exact = _dense(kernels, t, y, NOISE, t)
    approx = _dense(kernels, t, y + shift, site_scale * NOISE, t)
    log_evidence = sum(d["lml"] for d in exact)
    kl = sum(_kl(a["mean_o"], a["cov_o"], e["mean_o"], e["cov_o"]) for a, e in zip(approx, exact))

    num_samples = 4000
    terms = G.elbo_terms(jax.random.key(1), vae, t, y, num_samples=num_samples)
    post = G.posterior(vae, t, y)
    m, v = np.asarray(post.means)[obs], np.asarray(post.variances)[obs]
    # closed forms of the two expectations from the smoothed moments
    recon = np.sum(-0.5 * (np.log(2 * np.pi * NOISE) + ((y[obs] - m) ** 2 + v) / NOISE))
    V = site_scale * NOISE
    site = np.sum(-0.5 * (np.log(2 * np.pi * V) + ((y[obs] + shift - m) ** 2 + v) / V))
    np.testing.assert_allclose(terms.site_log_prob, site, rtol=1e-10, atol=1e-8)
    elbo_closed = recon - float(terms.site_log_prob) + float(terms.log_normaliser)
    np.testing.assert_allclose(elbo_closed, log_evidence - kl, rtol=1e-10, atol=1e-8)
    if shift == 0.0 and site_scale == 1.0:
        assert abs(kl) < 1e-8  # the exact sites: q = p(z | y), ELBO = log p(y)
    else:
        assert kl > 1e-3 and elbo_closed < log_evidence
    # the Monte Carlo reconstruction term: unbiased, within 5 standard errors of its closed form
    se = float(terms.reconstruction_std_error)
    assert 0 < se < 0.2
    assert abs(float(terms.reconstruction) - recon) < 5 * se
    assert abs(float(terms.elbo) - (log_evidence - kl)) < 5 * se


# ---------------------------------------------------------------------------------------------
# (4) jit / vmap / grad, batches, and the fit
# ---------------------------------------------------------------------------------------------
def _mlp_model(key, D=4, L=1, width=8):
    k1, k2 = jax.random.split(key)
    return M.MarkovianGPVAE((ps.gp.Matern32(lengthscale=2.0),) * L, M.mlp_encoder(k1, D, L, width, depth=1),
                            M.mlp_decoder(k2, L, D, width, depth=1), observation_variance=0.5)


def _synthetic(B=8, T=12, D=4, seed=0):
    """Sequences y = sin(f) W + noise with f a smooth random curve per sequence."""
    rng = np.random.default_rng(seed)
    t = np.arange(T, dtype=float)
    W = rng.normal(size=(1, D))
    phase = rng.uniform(0, 2 * np.pi, (B, 1, 1))
    f = np.sin(0.5 * t[None, :, None] + phase)
    ys = f * W + 0.1 * rng.normal(size=(B, T, D))
    ys[:, 3] = np.nan
    return t, ys


def _per_sequence_times(t, B):
    return np.stack([t * (1.0 + 0.1 * b) + 0.3 * b for b in range(B)])  # sorted, distinct per row


def test_jit_vmap_grad_and_batches():
    vae = _mlp_model(jax.random.key(0))
    t, ys = _synthetic()
    tb = _per_sequence_times(t, ys.shape[0])
    key = jax.random.key(2)

    batched = G.elbo(key, vae, tb, ys)
    assert batched.shape == (ys.shape[0],) and np.all(np.isfinite(batched))
    # jit(grad(vmap(elbo))) in one go; the batched call splits its key the same way
    keys = jax.random.split(key, ys.shape[0])

    @eqx.filter_jit
    def value_and_grad(m, tt, yy):
        return eqx.filter_value_and_grad(
            lambda mm: jnp.sum(jax.vmap(lambda k, a, b: G.elbo(k, mm, a, b))(keys, tt, yy)))(m)

    value, grads = value_and_grad(vae, jnp.asarray(tb), jnp.asarray(ys))
    np.testing.assert_allclose(value, jnp.sum(batched), rtol=1e-12)
    leaves = jax.tree_util.tree_leaves(eqx.filter(grads, eqx.is_inexact_array))
    assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
    assert float(jnp.abs(grads.kernels[0].lengthscale)) > 0  # the GP prior gets gradients too

    post = G.posterior(vae, tb, ys)
    assert post.means.shape == (ys.shape[0], t.size, 1) and np.all(np.isfinite(post.variances))
    # per-sequence new times; at a frame time the prediction repeats the smoothed marginal there
    at = G.predict(vae, tb, ys, np.stack([row[[1, 3]] for row in tb]))
    assert at.means.shape == (ys.shape[0], 2, 1) and at.decoded.shape == (ys.shape[0], 2, 4)
    np.testing.assert_allclose(at.means, post.means[:, [1, 3]], atol=1e-10)
    np.testing.assert_allclose(at.variances, post.variances[:, [1, 3]], atol=1e-10)


def test_fit_increases_elbo():
    vae = _mlp_model(jax.random.key(3))
    t, ys = _synthetic()
    tb = _per_sequence_times(t, ys.shape[0])

    def mean_elbo(m):  # the batched call compiled by the test above; averaged over 16 keys
        return float(np.mean([G.elbo(jax.random.key(100 + i), m, tb, ys) for i in range(16)]))

    before = mean_elbo(vae)
    fitted, history = LG.fit(jax.random.key(5), vae, tb, ys, 150, batch_size=4, optimizer=optax.adam(2e-2),
                             fixed=("observation_variance",))
    after = mean_elbo(fitted)
    assert history.shape == (150,) and np.all(np.isfinite(history))
    assert after > before + 5.0, (before, after)  # MC error of either mean: ~0.1
    assert np.mean(history[-20:]) > np.mean(history[:20])
    # the kernel moved and stayed positive, the fixed path stayed put, the input model is untouched
    assert float(fitted.kernels[0].lengthscale) != 2.0 and float(fitted.kernels[0].lengthscale) > 0
    assert float(fitted.observation_variance) == 0.5
    assert float(vae.kernels[0].lengthscale) == 2.0


# ---------------------------------------------------------------------------------------------
# (5) bad inputs: ValueErrors naming the argument
# ---------------------------------------------------------------------------------------------
def test_bad_inputs_name_the_argument():
    vae = _mlp_model(jax.random.key(0))
    t, ys = _synthetic(B=2)
    y = ys[0]
    key = jax.random.key(0)
    unsorted = t.copy()
    unsorted[[2, 4]] = unsorted[[4, 2]]
    repeated = t.copy()
    repeated[5] = repeated[4]

    for fn in (lambda tt, yy: G.elbo(key, vae, tt, yy), lambda tt, yy: G.predict(vae, tt, yy, np.array([1.5])),
               lambda tt, yy: LG.fit(key, vae, tt, yy, 2)):
        with pytest.raises(ValueError, match=r"^t: expected sorted"):
            fn(unsorted, y)
        with pytest.raises(ValueError, match=r"^t: expected distinct"):
            fn(repeated, y)
        with pytest.raises(ValueError, match=r"^t: expected 12 times"):
            fn(t[:-1], y)
    with pytest.raises(ValueError, match=r"^y: expected frames of shape \(T, 4\)"):
        G.elbo(key, vae, t, y[:, :3])
    with pytest.raises(ValueError, match=r"^y: expected frames"):
        G.predict(vae, t, y[:, 0], np.array([1.5]))
    with pytest.raises(ValueError, match=r"^ys: expected frames"):
        LG.fit(key, vae, t, ys[..., :2], 2)
    with pytest.raises(ValueError, match=r"^y: found inf"):
        G.elbo(key, vae, t, np.where(np.isnan(y), np.inf, y))
    with pytest.raises(ValueError, match=r"^t\[1\]: expected sorted"):
        G.elbo(key, vae, np.stack([t, unsorted]), ys)
    with pytest.raises(ValueError, match=r"^t_new: expected shape"):
        G.predict(vae, t, y, np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"^t_new: expected finite"):
        G.predict(vae, t, y, np.array([np.nan]))
    with pytest.raises(ValueError, match=r"^num_samples"):
        G.elbo(key, vae, t, y, num_samples=0)
    with pytest.raises(ValueError, match=r"^batch_size"):
        LG.fit(key, vae, t, ys, 2, batch_size=3)
    with pytest.raises(ValueError, match=r"^num_iters"):
        LG.fit(key, vae, t, ys, 0)
    with pytest.raises(ValueError, match=r"^fixed"):
        LG.fit(key, vae, t, ys, 2, fixed=("nonsense",))
    with pytest.raises(ValueError, match=r"^model: expected a ps.models.MarkovianGPVAE"):
        G.elbo(key, ps.models.MarkovianGP(ps.gp.Matern32()), t, y)
    with pytest.raises(ValueError, match=r"^likelihood"):
        M.MarkovianGPVAE(vae.kernels, vae.encoder, vae.decoder, likelihood="poisson")
    with pytest.raises(ValueError, match=r"^model.kernels.0.lengthscale"):
        G.elbo(key, eqx.tree_at(lambda m: m.kernels[0].lengthscale, vae, jnp.asarray(-1.0)), t, y)


@pytest.mark.parametrize("where", [lambda m: m.kernels[0].lengthscale, lambda m: m.observation_variance])
def test_tree_at_model_with_a_bad_value_is_named(where):
    """A model made by eqx.tree_at (its constructor skipped) is still checked by every public function."""
    enc = ps.models.gpvae.mlp_encoder(jax.random.key(1), 2, 1, width=4, depth=1)
    dec = ps.models.gpvae.mlp_decoder(jax.random.key(2), 1, 2, width=4, depth=1)
    model = ps.models.MarkovianGPVAE((ps.gp.Matern32(1.0),), enc, dec, observation_variance=0.5)
    bad = eqx.tree_at(where, model, -1.0)
    t, y = jnp.arange(6.0), jnp.ones((6, 2))
    for call in (lambda: ps.gpvae.elbo(jax.random.key(0), bad, t, y), lambda: ps.gpvae.posterior(bad, t, y),
                 lambda: ps.gpvae.impute(bad, t, y), lambda: ps.gpvae.predict(bad, t, y, t[:2])):
        with pytest.raises(ValueError, match=r"^model\.(kernels\.0\.lengthscale|observation_variance)"):
            call()
