"""`ps.learn.init_slds`: the ARHMM-on-PCA initialisation of SLDS learning."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

import probssm as ps

K, D, P = 2, 2, 4


def rotation(angle):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


@pytest.fixture(scope="module")
def data():
    # two well separated modes: a slow rotation about (+1, 0) and one about (-1, 0), sticky
    rng = np.random.default_rng(0)
    A = np.stack([rotation(0.2), rotation(-0.3)])
    centres = np.array([[1.0, 0.0], [-1.0, 0.0]])
    b = np.stack([(np.eye(D) - A[k]) @ centres[k] for k in range(K)])
    true = ps.models.SLDS(np.array([0.5, 0.5]), np.array([[0.97, 0.03], [0.03, 0.97]]), np.zeros(D), np.eye(D), A,
                          np.stack([0.01 * np.eye(D)] * K), rng.normal(size=(P, D)), 0.01 * np.eye(P),
                          dynamics_offsets=b, emission_offsets=rng.normal(size=P))
    states, y = jax.vmap(lambda k: ps.sample(k, true, 200))(jax.random.split(jax.random.key(0), 2))
    return np.asarray(states[..., 0]).astype(int), np.asarray(y)


def accuracy(z_hat, z):
    overlap = np.zeros((K, K))
    np.add.at(overlap, (z.ravel(), z_hat.ravel()), 1)
    rows, cols = linear_sum_assignment(-overlap)
    return overlap[rows, cols].sum() / z.size


def test_init_slds_segments_separated_modes_from_a_list_of_unequal_sequences(data):
    z, y = data
    seqs = [y[0], y[1, :150]]
    before = [s.copy() for s in seqs]
    model = ps.learn.init_slds(seqs, K, D)
    assert isinstance(model, ps.models.SLDS) and model.num_modes == K and model.state_dim == D
    assert model.emission_matrices.shape == (P, D)
    for s, s0 in zip(seqs, before):
        np.testing.assert_array_equal(s, s0)  # inputs untouched
    z_hat = np.asarray(ps.switching.most_likely_modes(model, y))
    acc = accuracy(z_hat, z)
    assert acc > 0.9, acc
    # the same seed gives the same model
    again = ps.learn.init_slds(seqs, K, D)
    np.testing.assert_array_equal(again.dynamics_matrices, model.dynamics_matrices)


def test_init_slds_recurrent_and_then_em(data):
    z, y = data
    rmodel = ps.learn.init_slds(jnp.asarray(y), K, D, recurrent=True, num_arhmm_iters=20)
    assert isinstance(rmodel, ps.models.RecurrentSLDS)
    assert rmodel.recurrence_weights.shape == (K, D) and rmodel.recurrence_biases.shape == (K,)
    fitted, elbos = ps.learn.em(ps.learn.init_slds(y, K, D, num_arhmm_iters=20), y, 5)
    assert np.all(np.diff(np.asarray(elbos)) > -1e-6)


def test_init_slds_bad_input(data):
    _, y = data
    with pytest.raises(ValueError, match="state_dim"):
        ps.learn.init_slds(y, K, P + 1)
    with pytest.raises(ValueError, match="num_modes"):
        ps.learn.init_slds(y, 0, D)
    with pytest.raises(ValueError, match="emissions"):
        ps.learn.init_slds(np.where(np.arange(200)[None, :, None] == 7, np.nan, y), K, D)
    with pytest.raises(ValueError, match="recurrent"):
        ps.learn.init_slds(y, K, D, recurrent="yes")
    with pytest.raises(ValueError, match="emissions"):
        jax.jit(lambda a: ps.learn.init_slds(a, K, D).dynamics_matrices)(jnp.asarray(y))
