"""Graph-switching dynamical systems: `GRASS` (Liu, Magliacane, Kofinas & Gavves, ICML 2023).

N objects share K linear-Gaussian modes; a time-varying interaction graph (one binary edge per
unordered pair, E = N (N - 1) / 2) lets a node's mode transition read its neighbours' modes::

    z_0^n ~ Cat(pi);   x_0^n | z_0^n = k ~ N(m_k, P_k);   e_0^{nm} ~ Cat(rho)
    p(e_t^{nm} = 1 | e_{t-1}^{nm} = j) = sigmoid(c_j + w u_t^{nm})            (u: edge inputs)
    p(z_t^n = k | z_{t-1}, e_t) = softmax_k(log P[z_{t-1}^n, k] + sum_{m != n} e_t^{nm} W[z_{t-1}^m, k])
    x_t^n = A_k x_{t-1}^n + b_k + N(0, Q_k),    k = z_t^n                      t = 1..T-1
    y_t^n = C_k x_t^n + d_k + N(0, R_k),         k = z_t^n                      t = 0..T-1

With W = 0 the modes ignore the edges and the objects are independent SLDS (`as_slds`). The
edge inputs u (T, E) are exogenous (e.g. the distance between two objects' observations), so
given them the discrete state s_t = (z_t^1..z_t^N, e_t^1..e_t^E) is an exact Markov chain over
S = K^N 2^E states (`joint_chain`), and given the discrete path the objects' continuous parts
are independent linear-Gaussian systems (block-diagonal dynamics, per-object emissions).

Joint states are numbered s = c * 2^E + g: c the mode configuration (object 0 the most
significant base-K digit), g the edge configuration (edge 0 the most significant bit); edges in
the order of `edge_pairs` ((0, 1), (0, 2), ..., (N-2, N-1)).
"""
from __future__ import annotations

import abc
import itertools
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import constraints

from probssm.core import checks
from probssm.core.protocol import LinearGaussianParams
from probssm.core.switching import SwitchingParams, check_switching_params
from probssm.models.slds import SLDS

__all__ = ["AbstractGraphSwitchingSSM", "GRASS", "GRASSSample", "edge_pairs"]

PSD = {"constraint": constraints.positive_definite}
REAL = {"constraint": constraints.real}
SIMPLEX = {"constraint": constraints.simplex}


def edge_pairs(num_objects: int) -> np.ndarray:
    """(E, 2) int pairs (n, m), n < m, in edge order."""
    pairs = list(itertools.combinations(range(num_objects), 2))
    return np.asarray(pairs, dtype=np.int32).reshape(-1, 2)


class GRASSSample(NamedTuple):
    """A draw from `GRASS.sample`."""

    modes: jax.Array  # (T, N) int z_t^n
    edges: jax.Array  # (T, E) int e_t^{nm}
    states: jax.Array  # (T, N, d) x_t^n
    emissions: jax.Array  # (T, N, p) y_t^n


def _edge_configurations(num_edges):
    """(2^E, E) int: every on/off pattern of the edges (edge 0 the most significant bit)."""
    return np.asarray(list(itertools.product(range(2), repeat=num_edges)), np.int32).reshape(2 ** num_edges, num_edges)


def _float(a, dtype):
    a = jnp.asarray(a)
    return a.astype(jnp.result_type(a.dtype, dtype, float))


def _per_mode(a, K, base_ndim):
    return a if a.ndim > base_ndim else jnp.broadcast_to(a, (K,) + a.shape)


class AbstractGraphSwitchingSSM(eqx.Module):
    """A graph-switching model: N objects with K shared linear-Gaussian modes and pairwise edges
    whose modes form, given the edge inputs, a Markov chain (unlocks
    `ps.switching.grass_structured_vi` and the GRASS EM). A subclass answers `num_objects`,
    `num_modes`, `state_dim`, `emission_dim`, `num_edges`, `num_joint_states`, `check_parameters`,
    `switching_params`, `edge_log_transitions`, `mode_log_transitions`, `joint_states`; the engines
    read only these."""

    @abc.abstractmethod
    def switching_params(self, num_timesteps: int) -> SwitchingParams: ...

    @abc.abstractmethod
    def edge_log_transitions(self, num_timesteps: int, edge_inputs=None) -> jax.Array: ...

    @abc.abstractmethod
    def mode_log_transitions(self) -> jax.Array: ...

    @abc.abstractmethod
    def check_parameters(self, name: str = "model") -> None: ...


class GRASS(AbstractGraphSwitchingSSM):
    """Graph-switching dynamical system (see the module doc for the generative model).

    Args:
        num_objects: N >= 1 (static).
        initial_probs: (K,) pi, p(z_0^n).
        transition_matrix: (K, K) P, rows sum to one (the mode chain without interactions).
        interaction_weights: (K, K) W; ``W[j, k]`` is added to the logit of next mode k for each
            active neighbour whose previous mode is j. Zero: independent SLDS.
        initial_means: (K, d) or (d,) shared.
        initial_covs: (K, d, d) or (d, d), positive definite.
        dynamics_matrices: (K, d, d) A_k.
        dynamics_covs: (K, d, d) Q_k, positive definite.
        emission_matrices: (p, d) C shared by every mode, or (K, p, d).
        emission_covs: (p, p) or (K, p, p) R, positive definite.
        dynamics_offsets: (K, d) b_k; zeros when None.
        emission_offsets: (p,) or (K, p) d; zeros when None.
        edge_initial_probs: (2,) p(e_0 = off), p(e_0 = on); default (0.5, 0.5).
        edge_biases: (2,) logits c_0, c_1 of an edge being on after being off / on; default (-2, 2).
        edge_weight: scalar w multiplying the edge inputs in the switch-on logit; default 0.

    Raises:
        ValueError: naming the argument, for wrong shapes, non-stochastic ``transition_matrix``,
            ``initial_probs`` or ``edge_initial_probs``, non-PSD covariances, non-finite values.

    Example:
        >>> grass = ps.models.GRASS(3, jnp.ones(2) / 2, jnp.array([[.9, .1], [.1, .9]]), jnp.zeros((2, 2)),
        ...                         jnp.zeros((2, 1)), jnp.ones((2, 1, 1)), jnp.array([[[.99]], [[.5]]]),
        ...                         0.1 * jnp.ones((2, 1, 1)), jnp.ones((1, 1)), 0.2 * jnp.ones((1, 1)))
        >>> draw = grass.sample(key, 50)      # .modes (50, 3), .edges (50, 3), .emissions (50, 3, 1)
    """

    num_objects: int = eqx.field(static=True)
    initial_probs: jax.Array = eqx.field(metadata=SIMPLEX)
    transition_matrix: jax.Array = eqx.field(metadata=SIMPLEX)
    interaction_weights: jax.Array = eqx.field(metadata=REAL)
    initial_means: jax.Array = eqx.field(metadata=REAL)
    initial_covs: jax.Array = eqx.field(metadata=PSD)
    dynamics_matrices: jax.Array = eqx.field(metadata=REAL)
    dynamics_offsets: jax.Array = eqx.field(metadata=REAL)
    dynamics_covs: jax.Array = eqx.field(metadata=PSD)
    emission_matrices: jax.Array = eqx.field(metadata=REAL)
    emission_offsets: jax.Array = eqx.field(metadata=REAL)
    emission_covs: jax.Array = eqx.field(metadata=PSD)
    edge_initial_probs: jax.Array = eqx.field(metadata=SIMPLEX)
    edge_biases: jax.Array = eqx.field(metadata=REAL)
    edge_weight: jax.Array = eqx.field(metadata=REAL)

    def __init__(self, num_objects, initial_probs, transition_matrix, interaction_weights, initial_means,
                 initial_covs, dynamics_matrices, dynamics_covs, emission_matrices, emission_covs,
                 dynamics_offsets=None, emission_offsets=None, edge_initial_probs=None, edge_biases=None,
                 edge_weight=0.0):
        self.num_objects = checks.positive_int(num_objects, "num_objects")
        F = checks.array(dynamics_matrices, "dynamics_matrices", (3,), "(K, d, d)")
        dtype = jnp.result_type(F.dtype, jnp.asarray(initial_probs).dtype, float)
        F = _float(F, dtype)
        K, d = F.shape[0], F.shape[-1]
        H = _float(emission_matrices, dtype)
        p = H.shape[-2] if H.ndim in (2, 3) else 0
        self.initial_probs = _float(initial_probs, dtype)
        self.transition_matrix = _float(transition_matrix, dtype)
        self.interaction_weights = _float(interaction_weights, dtype)
        self.initial_means = _per_mode(_float(initial_means, dtype), K, 1)
        self.initial_covs = _per_mode(_float(initial_covs, dtype), K, 2)
        self.dynamics_matrices = F
        self.dynamics_offsets = jnp.zeros((K, d), dtype) if dynamics_offsets is None else _float(dynamics_offsets,
                                                                                                 dtype)
        self.dynamics_covs = _float(dynamics_covs, dtype)
        self.emission_matrices = H
        self.emission_offsets = jnp.zeros((p,), dtype) if emission_offsets is None else _float(emission_offsets,
                                                                                               dtype)
        self.emission_covs = _float(emission_covs, dtype)
        self.edge_initial_probs = (jnp.full((2,), 0.5, dtype) if edge_initial_probs is None
                                   else _float(edge_initial_probs, dtype))
        self.edge_biases = jnp.asarray([-2.0, 2.0], dtype) if edge_biases is None else _float(edge_biases, dtype)
        self.edge_weight = _float(edge_weight, dtype)
        self.check_parameters()

    # --- sizes ------------------------------------------------------------------------
    @property
    def num_modes(self) -> int:
        return self.dynamics_matrices.shape[0]

    @property
    def state_dim(self) -> int:
        return self.dynamics_matrices.shape[-1]

    @property
    def emission_dim(self) -> int:
        return self.emission_matrices.shape[-2]

    @property
    def num_edges(self) -> int:
        return self.num_objects * (self.num_objects - 1) // 2

    @property
    def num_joint_states(self) -> int:
        """S = K^N 2^E, the size of the joint discrete chain."""
        return self.num_modes ** self.num_objects * 2 ** self.num_edges

    @property
    def shared_emissions(self) -> bool:
        return self.emission_matrices.ndim == 2

    # --- checks -------------------------------------------------------------------------
    def check_parameters(self, name: str = "model") -> None:
        """Shapes (always) and values (concrete arrays only) of every field; the error names the
        field, so a model altered by ``eqx.tree_at`` is caught where an engine starts.

        Raises:
            ValueError: naming the field, with the expected shape or property.
        """
        K, d = self.num_modes, self.state_dim
        if self.emission_matrices.ndim not in (2, 3) or self.emission_matrices.shape[-1] != d:
            raise ValueError(f"emission_matrices: expected shape (p, {d}) or ({K}, p, {d}), got shape "
                             f"{tuple(self.emission_matrices.shape)}")
        p = self.emission_dim
        want = {"initial_probs": [(K,)], "transition_matrix": [(K, K)], "interaction_weights": [(K, K)],
                "initial_means": [(K, d)], "initial_covs": [(K, d, d)], "dynamics_matrices": [(K, d, d)],
                "dynamics_offsets": [(K, d)], "dynamics_covs": [(K, d, d)], "emission_matrices": [(p, d), (K, p, d)],
                "emission_offsets": [(p,), (K, p)], "emission_covs": [(p, p), (K, p, p)],
                "edge_initial_probs": [(2,)], "edge_biases": [(2,)], "edge_weight": [()]}
        for field, shapes in want.items():
            a = getattr(self, field)
            if tuple(a.shape) not in shapes:
                doc = " or ".join(str(s) for s in shapes)
                raise ValueError(f"{field}: expected shape {doc}, got shape {tuple(a.shape)}")
        for field in ("initial_probs", "transition_matrix", "edge_initial_probs"):
            checks.probabilities(getattr(self, field), field)
        for field in ("initial_covs", "dynamics_covs", "emission_covs"):
            checks.psd(getattr(self, field), field, strict=True)
        for field in ("interaction_weights", "initial_means", "dynamics_matrices", "dynamics_offsets",
                      "emission_matrices", "emission_offsets", "edge_biases", "edge_weight"):
            checks.finite(getattr(self, field), field)

    # --- one object's switching system ------------------------------------------------
    def switching_params(self, num_timesteps: int) -> SwitchingParams:
        """Every object's `SwitchingParams` (pi, P and the per-mode systems): with W = 0 each
        object is this SLDS. Traceable."""
        K = self.num_modes
        H = _per_mode(self.emission_matrices, K, 2)
        dd = _per_mode(self.emission_offsets, K, 1)
        R = _per_mode(self.emission_covs, K, 2)
        sys = LinearGaussianParams(self.initial_means, self.initial_covs, self.dynamics_matrices,
                                   self.dynamics_offsets, self.dynamics_covs, H, dd, R)
        return SwitchingParams(self.initial_probs, self.transition_matrix, sys)

    def check_switching(self) -> None:
        """`check_switching_params` of one object's system, errors naming this model's fields."""
        names = {"initial_probs": "initial_probs", "transition_matrices": "transition_matrix",
                 "initial_mean": "initial_means", "initial_cov": "initial_covs",
                 "transition_matrix": "dynamics_matrices", "transition_offset": "dynamics_offsets",
                 "transition_cov": "dynamics_covs", "emission_matrix": "emission_matrices",
                 "emission_offset": "emission_offsets", "emission_cov": "emission_covs"}
        check_switching_params(self.switching_params(1), self.num_modes, self.state_dim, self.emission_dim, names)

    def as_slds(self) -> SLDS:
        """The SLDS each object follows when the interactions are off (W = 0)."""
        return SLDS(self.initial_probs, self.transition_matrix, self.initial_means, self.initial_covs,
                    self.dynamics_matrices, self.dynamics_covs, self.emission_matrices, self.emission_covs,
                    dynamics_offsets=self.dynamics_offsets, emission_offsets=self.emission_offsets)

    # --- the discrete chain -----------------------------------------------------------
    def joint_states(self):
        """(modes (S, N) int, edges (S, E) int): the configuration of each joint state (numpy)."""
        K, N, E = self.num_modes, self.num_objects, self.num_edges
        modes = np.asarray(list(itertools.product(range(K), repeat=N)), np.int32).reshape(K ** N, N)
        edges = _edge_configurations(E)
        G = edges.shape[0]
        return np.repeat(modes, G, axis=0), np.tile(edges, (modes.shape[0], 1))

    def edge_log_transitions(self, num_timesteps: int, edge_inputs=None) -> jax.Array:
        """(T, E, 2, 2) log p(e_t = i | e_{t-1} = j) at ``[t, edge, j, i]`` (row t = 0 unused).
        ``edge_inputs``: None (zero) or (T, E). Traceable."""
        E = self.num_edges
        dtype = self.edge_biases.dtype
        u = jnp.zeros((num_timesteps, E), dtype) if edge_inputs is None else jnp.asarray(edge_inputs, dtype)
        logit = self.edge_biases[None, None, :] + self.edge_weight * u[:, :, None]  # (T, E, j)
        return jnp.stack([jax.nn.log_sigmoid(-logit), jax.nn.log_sigmoid(logit)], axis=-1)

    def mode_log_transitions(self) -> jax.Array:
        """(C, G, C) log p(z_t = c | z_{t-1} = c', e_t = g) at ``[c', g, c]`` over the C = K^N mode
        and G = 2^E edge configurations (time-invariant). Traceable."""
        modes, _ = self.joint_states()
        K, N, E = self.num_modes, self.num_objects, self.num_edges
        G = 2 ** E
        cfg = modes[::G]  # (C, N)
        edges = _edge_configurations(E)  # (G, E)
        adj = np.zeros((G, N, N), np.int32)
        for i, (n, m) in enumerate(edge_pairs(N)):
            adj[:, n, m] = adj[:, m, n] = edges[:, i]
        logP = jnp.log(self.transition_matrix)
        W = self.interaction_weights
        # logits[c', g, n, k] = log P[c'_n, k] + sum_m adj[g, n, m] W[c'_m, k]
        own = logP[cfg]  # (C, N, K)
        msg = jnp.einsum("gnm,cmk->cgnk", jnp.asarray(adj, W.dtype), W[cfg])
        logp = jax.nn.log_softmax(own[:, None] + msg, axis=-1)  # (C, G, N, K)
        # pick the next configuration's mode of each object: sum_n logp[c', g, n, c_n]
        return jnp.einsum("agnk,cnk->agc", logp, jax.nn.one_hot(cfg, K, dtype=logp.dtype))

    def joint_chain(self, num_timesteps: int, edge_inputs=None):
        """The joint discrete chain over s = (z^1..z^N, e^1..e^E) (S = K^N 2^E states, small
        problems: dense matrices).

        Returns:
            ``(log_initial (S,), log_transitions (T - 1, S, S))``, ``log_transitions[t - 1, s', s]``
            = log p(s_t = s | s_{t-1} = s').
        """
        modes, edges = self.joint_states()
        G = 2 ** self.num_edges
        le = self.edge_log_transitions(num_timesteps, edge_inputs)[1:]  # (T-1, E, 2, 2)
        cfg_e = edges[:G]  # (G, E)
        ar = np.arange(self.num_edges)
        # log E_t[g', g] = sum_m le[t, m, g'_m, g_m]
        Et = jnp.sum(le[:, ar[None, None, :], cfg_e[:, None, :], cfg_e[None, :, :]], axis=-1)  # (T-1, G, G)
        Mz = self.mode_log_transitions()  # (C, G, C)
        C = Mz.shape[0]
        # log A[(c', g'), (c, g)] = log E[g', g] + log Mz[c', g, c]
        logA = Et[:, None, :, None, :] + jnp.transpose(Mz, (0, 2, 1))[None, :, None, :, :]
        logA = logA.reshape(le.shape[0], C * G, C * G)
        log_pi = jnp.log(self.initial_probs)
        log_rho = jnp.log(self.edge_initial_probs)
        init = jnp.sum(log_pi[modes], axis=1) + jnp.sum(log_rho[edges], axis=1)
        return init, logA

    # --- sampling ---------------------------------------------------------------------
    def sample(self, key, num_timesteps: int, edge_inputs=None) -> GRASSSample:
        """Draw modes, edges, states and emissions for ``num_timesteps`` steps (ancestral). Traceable."""
        T = checks.positive_int(num_timesteps, "num_timesteps")
        N, K, d = self.num_objects, self.num_modes, self.state_dim
        pairs = jnp.asarray(edge_pairs(N))
        le = self.edge_log_transitions(T, edge_inputs)
        H = _per_mode(self.emission_matrices, K, 2)
        dd = _per_mode(self.emission_offsets, K, 1)
        R = _per_mode(self.emission_covs, K, 2)
        LQ = jnp.linalg.cholesky(self.dynamics_covs)
        LR = jnp.linalg.cholesky(R)
        LP = jnp.linalg.cholesky(self.initial_covs)
        W = self.interaction_weights

        def emit(k, x, z):
            return H[z] @ x + dd[z] + LR[z] @ jax.random.normal(k, (H.shape[1],), x.dtype)

        k0, kz, ke, kx, ky, kscan = jax.random.split(key, 6)
        z0 = jax.random.categorical(kz, jnp.log(self.initial_probs), shape=(N,))
        e0 = jax.random.categorical(ke, jnp.log(self.edge_initial_probs), shape=(pairs.shape[0],))
        x0 = self.initial_means[z0] + jnp.einsum("nij,nj->ni", LP[z0], jax.random.normal(kx, (N, d), W.dtype))
        y0 = jax.vmap(emit)(jax.random.split(ky, N), x0, z0)

        def step(carry, xs):
            z, e, x = carry
            t, k = xs
            k1, k2, k3, k4 = jax.random.split(k, 4)
            e_new = jax.random.categorical(k1, le[t, jnp.arange(pairs.shape[0]), e])
            adj = jnp.zeros((N, N), W.dtype).at[pairs[:, 0], pairs[:, 1]].set(e_new).at[pairs[:, 1], pairs[:, 0]].set(
                e_new)
            logits = jnp.log(self.transition_matrix)[z] + adj @ W[z]
            z_new = jax.random.categorical(k2, logits)
            mean = jnp.einsum("nij,nj->ni", self.dynamics_matrices[z_new], x) + self.dynamics_offsets[z_new]
            x_new = mean + jnp.einsum("nij,nj->ni", LQ[z_new], jax.random.normal(k3, (N, d), x.dtype))
            y = jax.vmap(emit)(jax.random.split(k4, N), x_new, z_new)
            return (z_new, e_new, x_new), (z_new, e_new, x_new, y)

        _, (zs, es, xs, ys) = jax.lax.scan(step, (z0, e0, x0), (jnp.arange(1, T), jax.random.split(kscan, T - 1)))
        cat = lambda a, b: jnp.concatenate([a[None], b])
        return GRASSSample(cat(z0, zs), cat(e0, es), cat(x0, xs), cat(y0, ys))
