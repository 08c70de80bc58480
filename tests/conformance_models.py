"""Models shared by the conformance tests (tests/test_conformance_*.py): every engine runs on
every model family it claims, through the declared protocol only.

Families: linear-Gaussian, a user-written linear-Gaussian subclass with inputs, nonlinear
additive-Gaussian, a user-written additive-Gaussian subclass, stochastic volatility, a plain
user `ps.SSM`, Gaussian / Poisson / Categorical HMMs, an autoregressive HMM and an HMM-GLM.
Where a free exact oracle exists (`ps.kalman` for linear-Gaussian models, `ps.hmm` for
finite-state ones) the particle engines are compared with it; the tolerances come from the
Monte Carlo standard error of R independent runs (one batched call, fixed keys).
"""
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

import probssm as ps
from probssm.core import AbstractAdditiveGaussianSSM, AbstractLinearGaussianSSM, LinearGaussianParams

T = 15
R = 32          # independent particle runs for the Monte Carlo checks
N = 128         # particles


# ----------------------------------------------------------------------------------------------
# User-written models: they subclass the abstract structures only
# ----------------------------------------------------------------------------------------------
class UserLinearGaussian(AbstractLinearGaussianSSM):
    """A local-linear model with a control input, written against the abstract class."""

    a: jax.Array
    q: jax.Array
    r: jax.Array
    gain: jax.Array

    @property
    def state_dim(self):
        return 1

    @property
    def emission_dim(self):
        return 1

    @property
    def input_dim(self):
        return 1

    def linear_gaussian_params(self, num_timesteps, inputs=None):
        b = jnp.zeros((num_timesteps, 1)) if inputs is None else inputs @ self.gain[None, :]
        one = jnp.ones((1, 1))
        return LinearGaussianParams(jnp.zeros(1), one, self.a * one, b, self.q * one, one, jnp.zeros(1),
                                    self.r * one)

    def initial(self, inputs=None):
        return dist.MultivariateNormal(jnp.zeros(1), jnp.eye(1))

    def transition(self, z_prev, t, inputs=None):
        return dist.MultivariateNormal(self.a * z_prev + self.gain * inputs[0], self.q * jnp.eye(1))

    def emission(self, z, t, inputs=None):
        return dist.MultivariateNormal(z, self.r * jnp.eye(1))


class UserAdditive(AbstractAdditiveGaussianSSM):
    """z_t = 0.9 tanh(z_{t-1}) + noise; y_t = z_t + z_t^3 / 10 + noise."""

    q: jax.Array
    r: jax.Array

    @property
    def state_dim(self):
        return 1

    @property
    def emission_dim(self):
        return 1

    def initial_moments(self, inputs=None):
        return jnp.zeros(1), jnp.eye(1)

    def transition_mean(self, z_prev, t, inputs=None):
        return 0.9 * jnp.tanh(z_prev)

    def transition_noise_cov(self, t, inputs=None):
        return self.q * jnp.eye(1)

    def emission_mean(self, z, t, inputs=None):
        return z + z ** 3 / 10

    def emission_noise_cov(self, t, inputs=None):
        return self.r * jnp.eye(1)


class RandomWalk(ps.SSM):
    """The plain protocol, as in docs/protocol.md."""

    scale: jax.Array
    noise: jax.Array

    def initial(self, inputs=None):
        return dist.Normal(0.0, 1.0).expand([1]).to_event(1)

    def transition(self, z_prev, t, inputs=None):
        return dist.Normal(z_prev, self.scale).to_event(1)

    def emission(self, z, t, inputs=None):
        return dist.Normal(z, self.noise).to_event(1)


def _sticky(K):
    return jnp.asarray(0.8 * np.eye(K) + 0.2 / (K - 1) * (1 - np.eye(K)))


def make_models():
    K = 2
    models = {
        "lgssm": ps.models.LinearGaussianSSM(jnp.zeros(2), jnp.eye(2), jnp.array([[0.9, 0.1], [0.0, 0.8]]),
                                             0.2 * jnp.eye(2), jnp.array([[1.0, 0.5]]), 0.5 * jnp.eye(1)),
        "user_lgssm": UserLinearGaussian(jnp.asarray(0.8), jnp.asarray(0.3), jnp.asarray(0.5), jnp.asarray([0.7])),
        "nonlinear": ps.models.NonlinearGaussianSSM(jnp.zeros(1), jnp.eye(1), lambda z, t, u: 0.9 * jnp.sin(z),
                                                    0.2 * jnp.eye(1), lambda z, t, u: z + 0.1 * z ** 2,
                                                    0.5 * jnp.eye(1)),
        "user_additive": UserAdditive(jnp.asarray(0.2), jnp.asarray(0.5)),
        "stochastic_volatility": ps.models.StochasticVolatility(),
        "user_ssm": RandomWalk(jnp.ones(1) * 0.5, jnp.ones(1)),
        "hmm_gaussian": ps.models.HMM(jnp.ones(K) / K, _sticky(K),
                                      ps.emissions.Gaussian(jnp.array([[-1.0], [1.0]]), jnp.ones((K, 1, 1)))),
        "hmm_poisson": ps.models.HMM(jnp.ones(K) / K, _sticky(K), ps.emissions.Poisson(jnp.array([[1.0], [4.0]]))),
        "hmm_categorical": ps.models.HMM(jnp.ones(K) / K, _sticky(K),
                                         ps.emissions.Categorical(jnp.array([[[0.7, 0.2, 0.1]], [[0.1, 0.2, 0.7]]]))),
        "arhmm": ps.models.ARHMM(jnp.ones(K) / K, _sticky(K), jnp.array([[[0.8]], [[-0.5]]]),
                                 jnp.array([[0.5], [-0.5]]), 0.3 * jnp.ones((K, 1, 1))),
        "hmmglm": ps.models.HMMGLM.create(jax.random.PRNGKey(3), num_states=K, num_neurons=2),
    }
    return models


MODELS = make_models()
LINEAR = ("lgssm", "user_lgssm")
DISCRETE = ("hmm_gaussian", "hmm_poisson", "hmm_categorical", "arhmm", "hmmglm")
ADDITIVE = ("lgssm", "nonlinear", "user_additive")
CONTINUOUS = ("lgssm", "user_lgssm", "nonlinear", "user_additive", "stochastic_volatility", "user_ssm")


def inputs_for(name) -> Optional[jax.Array]:
    if name == "user_lgssm":
        return jnp.sin(jnp.arange(T, dtype=float))[:, None]
    return None


def make_data():
    out = {}
    for i, (name, model) in enumerate(MODELS.items()):
        states, y = ps.sample(jax.random.PRNGKey(100 + i), model, T, inputs=inputs_for(name))
        assert states.shape[0] == T and y.shape[0] == T
        out[name] = jnp.asarray(y, float)
    return out


def exact_log_likelihood(name, y):
    model = MODELS[name]
    if name in LINEAR:
        return float(ps.kalman.filter(model, y, inputs=inputs_for(name)).log_likelihood)
    if name in DISCRETE:
        return float(ps.hmm.filter(model, y).log_likelihood)
    return None


def _first_coordinate_functional(name):
    """An additive functional with an exact smoothed value where an oracle exists."""
    if name in DISCRETE:
        return ps.smc.AdditiveFunctional(lambda z, y, u: (z == 0).astype(float),
                                         lambda zp, z, t, y, u: (z == 0).astype(float))
    return ps.smc.AdditiveFunctional(lambda z, y, u: z[0], lambda zp, z, t, y, u: z[0])


def exact_functional(name, y):
    model = MODELS[name]
    if name in LINEAR:
        return float(ps.kalman.smoother(model, y, inputs=inputs_for(name)).smoothed_means[:, 0].sum())
    if name in DISCRETE:
        return float(ps.hmm.smoother(model, y).smoothed_probs[:, 0].sum())
    return None
