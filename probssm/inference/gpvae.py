"""Inference for the Markovian GP-VAE (`probssm.models.gpvae.MarkovianGPVAE`): `ps.gpvae`.

For one sequence of frames y (T, D) at sorted times t (T,), the encoder turns every observed frame
into a Gaussian site N(y~_t; z_t, diag(V~_t)) and the approximate posterior is

    q(z) = p(z) prod_{t observed} N(y~_t; z_t, V~_t) / Z,

GP regression on the pseudo-observations y~ with noise V~. Its evidence lower bound is

    ELBO = sum_t E_q[log p(y_t | z_t)] - ( sum_t E_q[log N(y~_t; z_t, V~_t)] - log Z ),

because log p(z) - log q(z) = log Z - sum_t log N(y~_t; z_t, V~_t). The L latent functions are
independent a priori and the sites are diagonal, so q(z) factorises over l: one Kalman smoother per
latent function (the kernels' state-space form, O(T)) gives its marginals q(z_{l,t}) =
N(m_{l,t}, v_{l,t}) and its log Z_l; log Z = sum_l log Z_l. (Kernels of one type are stacked and
smoothed under one `vmap`; the block-diagonal state of `model.prior()` gives the same numbers at a
higher cost.) The site term is closed-form,

    E_q[log N(y~; z, V~)] = sum_l -1/2 [log(2 pi V~_l) + ((y~_l - m_l)^2 + v_l) / V~_l],

and the reconstruction term is a reparameterised Monte Carlo average over draws
z_t = m_t + sqrt(v_t) eps_t from the marginals (it needs nothing else).

A frame (row of y) with any NaN is a *missing frame*: it is not encoded, gets no site (zero site
precision) and contributes no reconstruction term; its latent posterior comes from the GP prior
and its neighbours. Reference loop of `elbo` for one sequence::

    sites = [encoder(y_t) for t if y_t observed]
    m, v, log Z = kalman_smoother(GP prior at t, sites)           # per latent function
    elbo = sum_{t obs} mean_s log p(y_t | m_t + sqrt(v_t) eps_{s,t})
           - sum_{t obs} E_q log N(y~_t; z_t, V~_t) + log Z

Every function takes one sequence (t (T,), y (T, D)) or a batch (y (B, T, D) with t shared (T,) or
per sequence (B, T)), checks its arguments once (concrete values only) and is traceable.
"""
from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from probssm.core import checks
from probssm.inference import kalman
from probssm.models.gp import MarkovianGP, check_times
from probssm.models.gpvae import MarkovianGPVAE, check_model

__all__ = ["elbo", "elbo_terms", "posterior", "impute", "predict", "ELBOTerms", "Posterior", "Prediction",
           "check_arguments"]

_LOG_2PI = 1.8378770664093453


class ELBOTerms(NamedTuple):
    """The ELBO and its three pieces (leading axis B for a batch)."""

    elbo: jax.Array  # ()  reconstruction - site_log_prob + log_normaliser
    reconstruction: jax.Array  # ()  Monte Carlo estimate of sum_t E_q[log p(y_t | z_t)]
    site_log_prob: jax.Array  # ()  sum_t E_q[log N(y~_t; z_t, V~_t)] (closed form)
    log_normaliser: jax.Array  # ()  log Z (Kalman filter on the sites)
    reconstruction_std_error: jax.Array  # ()  Monte Carlo standard error (nan for one sample)


class Posterior(NamedTuple):
    """Smoothed marginals q(z_t) of the latent functions."""

    means: jax.Array  # (T, L)
    variances: jax.Array  # (T, L)
    log_normaliser: jax.Array  # ()  log Z


class Prediction(NamedTuple):
    """Latent marginals and decoded means at new times."""

    means: jax.Array  # (T_new, L)
    variances: jax.Array  # (T_new, L)
    decoded: jax.Array  # (T_new, D)  decoder mean at the posterior mean E_q[z_t]


# ----------------------------------------------------------------------------------------------
# Traceable cores (one sequence, no checks)
# ----------------------------------------------------------------------------------------------
def _stack_kernels(kernels):
    """The kernels as one kernel with stacked hyperparameters when they share a structure (so one
    vmapped smoother runs all latent functions), else None."""
    first = jax.tree_util.tree_structure(kernels[0])
    shapes = [tuple(jnp.shape(x) for x in jax.tree_util.tree_leaves(k)) for k in kernels]
    if any(jax.tree_util.tree_structure(k) != first for k in kernels[1:]) or len(set(shapes)) != 1:
        return None
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *kernels)


def _smooth_one(kernel, t, site_mean, site_var):
    """Smoothed means, variances (T,) and log Z of one latent function given its sites (T,)
    (NaN mean = no site)."""
    gp = MarkovianGP(kernel, noise_variance=1.0)
    params = gp.params_at(t)
    dtype = params.initial_cov.dtype
    params = params._replace(emission_cov=site_var.astype(dtype)[:, None, None])
    post = kalman.smoother_params(params, site_mean.astype(dtype)[:, None], diffuse=False)
    G = kernel.measurement_vector().astype(dtype)
    means = post.smoothed_means @ G
    variances = jnp.einsum("i,tij,j->t", G, post.smoothed_covs, G)
    return means, variances, post.log_likelihood


def smooth_sites(model: MarkovianGPVAE, t, site_means, site_vars, observed):
    """q(z) marginals and log Z given sites: the traceable core (no checks).

    Args:
        model: a `MarkovianGPVAE` (only its kernels are read).
        t: (T,) sorted times.
        site_means: (T, L) pseudo-observations y~_t.
        site_vars: (T, L) positive site variances V~_t.
        observed: (T,) bool; False rows get no site.

    Returns:
        (means (T, L), variances (T, L), log Z ()).
    """
    y = jnp.where(observed[:, None], site_means, jnp.nan)
    v = jnp.where(observed[:, None], site_vars, 1.0)
    stacked = _stack_kernels(model.kernels)
    if stacked is not None:
        m, s, lz = jax.vmap(_smooth_one, in_axes=(0, None, 1, 1), out_axes=(1, 1, 0))(stacked, t, y, v)
    else:
        outs = [_smooth_one(k, t, y[:, i], v[:, i]) for i, k in enumerate(model.kernels)]
        m = jnp.stack([o[0] for o in outs], axis=1)
        s = jnp.stack([o[1] for o in outs], axis=1)
        lz = jnp.stack([o[2] for o in outs])
    return m, s, jnp.sum(lz)


def _sites(model, y):
    observed = ~jnp.any(jnp.isnan(y), axis=-1)
    frames = jnp.where(observed[:, None], y, 0.0)  # never feed NaN to the encoder (NaN grads)
    mu, var = model.encode(frames)
    return frames, observed, mu, var


def _site_log_prob(mu, var, m, s, observed):
    per = -0.5 * (_LOG_2PI + jnp.log(var) + ((mu - m) ** 2 + s) / var)
    return jnp.sum(jnp.where(observed[:, None], per, 0.0))


def elbo_terms_one(key, model: MarkovianGPVAE, t, y, num_samples: int = 1) -> ELBOTerms:
    """`elbo_terms` for one sequence, without checks (traceable; ``num_samples`` static)."""
    frames, observed, mu, var = _sites(model, y)
    m, s, log_z = smooth_sites(model, t, mu, var, observed)
    site = _site_log_prob(mu, var, m, s, observed)
    eps = jax.random.normal(key, (num_samples,) + m.shape, m.dtype)
    z = m + jnp.sqrt(s) * eps  # (S, T, L) draws from the marginals q(z_t)
    lp = jax.vmap(jax.vmap(model.emission_log_prob))(jnp.broadcast_to(frames, (num_samples,) + frames.shape), z)
    per_draw = jnp.sum(jnp.where(observed, lp, 0.0), axis=1)  # (S,)
    recon = jnp.mean(per_draw)
    se = (jnp.std(per_draw, ddof=1) / np.sqrt(num_samples) if num_samples > 1
          else jnp.full((), jnp.nan, per_draw.dtype))
    return ELBOTerms(recon - site + log_z, recon, site, log_z, se)


def posterior_one(model: MarkovianGPVAE, t, y) -> Posterior:
    """`posterior` for one sequence, without checks (traceable)."""
    _, observed, mu, var = _sites(model, y)
    return Posterior(*smooth_sites(model, t, mu, var, observed))


def predict_one(model: MarkovianGPVAE, t, y, t_new) -> Prediction:
    """`predict` for one sequence, without checks (traceable): one smoother over t and t_new merged."""
    T = t.shape[0]
    _, observed, mu, var = _sites(model, y)
    merged = jnp.concatenate([t, t_new.astype(t.dtype)])
    order = jnp.argsort(merged, stable=True)  # a new time equal to a training time follows it
    n_new = t_new.shape[0]
    obs_all = jnp.concatenate([observed, jnp.zeros(n_new, bool)])[order]
    mu_all = jnp.concatenate([mu, jnp.zeros((n_new, mu.shape[1]), mu.dtype)])[order]
    var_all = jnp.concatenate([var, jnp.ones((n_new, var.shape[1]), var.dtype)])[order]
    m, s, _ = smooth_sites(model, merged[order], mu_all, var_all, obs_all)
    where = jnp.argsort(order)[T:]  # rows of the new times in the sorted grid
    m, s = m[where], s[where]
    return Prediction(m, s, jax.vmap(model.emission_mean)(m))


# ----------------------------------------------------------------------------------------------
# Argument checks (once, at the public functions, concrete values only)
# ----------------------------------------------------------------------------------------------
def _check_model(model) -> None:
    check_model(model)
    checks.once_per_model(model, "parameters", lambda: model.check_parameters())


def _check_t(t, T: int, B, name: str):
    """Times (T,) shared or (B, T) per sequence, each row sorted and distinct."""
    a = jnp.asarray(t)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        a = a.astype(jnp.result_type(float))
    if a.ndim == 1 or (B is None and a.ndim == 2 and a.shape[-1] == 1):
        a = check_times(a, name)
        if a.shape[0] != T:
            raise ValueError(f"{name}: expected {T} times (one per frame of y), got shape {tuple(a.shape)}")
        return a, False
    if B is not None and a.ndim == 2:
        if a.shape != (B, T):
            raise ValueError(f"{name}: expected shape ({T},) shared or ({B}, {T}) per sequence, "
                             f"got shape {tuple(a.shape)}")
        if checks.is_concrete(a):
            rows = np.asarray(a)
            for b in range(B):
                check_times(rows[b], f"{name}[{b}]")
        return a, True
    doc = f"({T},)" if B is None else f"({T},) or ({B}, {T})"
    raise ValueError(f"{name}: expected shape {doc}, got shape {tuple(a.shape)}")


def check_arguments(model, t, y, name_t: str = "t", name_y: str = "y"):
    """Checked (t, y, batched, t_batched): y (T, D) or (B, T, D), t (T,) or (B, T).

    Raises:
        ValueError: naming the argument, for a model that is not a `MarkovianGPVAE`, y of the
            wrong shape or holding inf, times that are not (T,) / (B, T), unsorted or repeated.
    """
    _check_model(model)
    D = model.emission_dim()
    a = jnp.asarray(y)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        a = a.astype(jnp.result_type(float))
    if a.ndim not in (2, 3) or a.shape[-1] != D or a.shape[-2] < 1:
        raise ValueError(f"{name_y}: expected frames of shape (T, {D}) or (B, T, {D}) (D = the decoder's output "
                         f"width), got shape {tuple(a.shape)}")
    if checks.is_concrete(a) and np.isinf(np.asarray(a)).any():
        raise ValueError(f"{name_y}: found inf; use NaN to mark a missing frame")
    batched = a.ndim == 3
    ts, t_batched = _check_t(t, a.shape[-2], a.shape[0] if batched else None, name_t)
    dtype = jnp.result_type(a.dtype, ts.dtype)
    return ts.astype(dtype), a.astype(dtype), batched, t_batched


def _num_samples(n) -> int:
    return checks.positive_int(n, "num_samples")


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------
@eqx.filter_jit
def _elbo_terms(key, model, t, y, num_samples, batched, t_batched):
    if not batched:
        return elbo_terms_one(key, model, t, y, num_samples)
    keys = jax.random.split(key, y.shape[0])
    return jax.vmap(lambda k, tt, yy: elbo_terms_one(k, model, tt, yy, num_samples),
                    in_axes=(0, 0 if t_batched else None, 0))(keys, t, y)


def elbo_terms(key, model: MarkovianGPVAE, t, y, num_samples: int = 1) -> ELBOTerms:
    """The ELBO and its pieces: reconstruction, site term and log Z (see the module doc).

    Args:
        key: a `jax.random` key (the reparameterised draws of the reconstruction term).
        model: a `ps.models.gpvae.MarkovianGPVAE`.
        t: (T,) sorted, distinct frame times, or (B, T) per sequence.
        y: (T, D) frames, or (B, T, D); a row with NaN is a missing frame.
        num_samples: draws per frame for the reconstruction term (static int).

    Returns:
        `ELBOTerms` of scalars, or of (B,) arrays for a batch (each sequence its own key).

    Raises:
        ValueError: naming the argument (see `check_arguments`; ``num_samples`` < 1).
    """
    num_samples = _num_samples(num_samples)
    t, y, batched, t_batched = check_arguments(model, t, y)
    return _elbo_terms(key, model, t, y, num_samples, batched, t_batched)


def elbo(key, model: MarkovianGPVAE, t, y, num_samples: int = 1) -> jax.Array:
    """Evidence lower bound of one sequence (scalar) or of each sequence of a batch (B,).

    ELBO = sum_t E_q[log p(y_t | z_t)] - (sum_t E_q[log N(y~_t; z_t, V~_t)] - log Z), with q(z)
    and log Z from a Kalman smoother on the encoder's sites; see `elbo_terms` for the arguments.

    Example:
        >>> value, grads = eqx.filter_value_and_grad(lambda m: -ps.gpvae.elbo(key, m, t, y))(vae)
    """
    return elbo_terms(key, model, t, y, num_samples).elbo


@eqx.filter_jit
def _posterior(model, t, y, batched, t_batched):
    if not batched:
        return posterior_one(model, t, y)
    return jax.vmap(lambda tt, yy: posterior_one(model, tt, yy), in_axes=(0 if t_batched else None, 0))(t, y)


def posterior(model: MarkovianGPVAE, t, y) -> Posterior:
    """Smoothed latent marginals q(z_t) at the frame times (missing frames included).

    Args:
        model, t, y: as `elbo_terms`.

    Returns:
        `Posterior`: means (T, L), variances (T, L), log_normaliser () (leading B for a batch).
    """
    t, y, batched, t_batched = check_arguments(model, t, y)
    return _posterior(model, t, y, batched, t_batched)


@eqx.filter_jit
def _impute(model, t, y, batched, t_batched):
    def one(tt, yy):
        return jax.vmap(model.emission_mean)(posterior_one(model, tt, yy).means)

    if not batched:
        return one(t, y)
    return jax.vmap(one, in_axes=(0 if t_batched else None, 0))(t, y)


def impute(model: MarkovianGPVAE, t, y) -> jax.Array:
    """Decoded frames at every time, missing frames included: decoder mean at E_q[z_t].

    Args:
        model, t, y: as `elbo_terms`.

    Returns:
        (T, D) (or (B, T, D)): the Gaussian mean / Bernoulli probabilities of decoder(E_q[z_t]).
    """
    t, y, batched, t_batched = check_arguments(model, t, y)
    return _impute(model, t, y, batched, t_batched)


@eqx.filter_jit
def _predict(model, t, y, t_new, batched, t_batched, new_batched):
    if not batched:
        return predict_one(model, t, y, t_new)
    return jax.vmap(lambda tt, yy, nn: predict_one(model, tt, yy, nn),
                    in_axes=(0 if t_batched else None, 0, 0 if new_batched else None))(t, y, t_new)


def predict(model: MarkovianGPVAE, t, y, t_new) -> Prediction:
    """Latent marginals and decoded means at new times, from one smoother pass.

    The new times are merged into the frame times as frames without sites, so one Kalman smoother
    over T + T_new steps gives every marginal (new times may lie anywhere, in any order, and may
    repeat frame times).

    Args:
        model, t, y: as `elbo_terms`.
        t_new: (T_new,) new times (shared by a batch) or (B, T_new) per sequence.

    Returns:
        `Prediction`: means (T_new, L), variances (T_new, L), decoded (T_new, D) (leading B for a
        batch).
    """
    t, y, batched, t_batched = check_arguments(model, t, y)
    tn = jnp.asarray(t_new)
    if tn.ndim == 0:
        tn = tn[None]
    new_batched = batched and tn.ndim == 2
    if tn.ndim != (2 if new_batched else 1) or (new_batched and tn.shape[0] != y.shape[0]):
        doc = "(T_new,)" if not batched else f"(T_new,) or ({y.shape[0]}, T_new)"
        raise ValueError(f"t_new: expected shape {doc}, got shape {tuple(tn.shape)}")
    if checks.is_concrete(tn) and not np.all(np.isfinite(np.asarray(tn, dtype=float))):
        raise ValueError("t_new: expected finite times, found NaN or inf")
    return _predict(model, t, y, tn.astype(t.dtype), batched, t_batched, new_batched)
