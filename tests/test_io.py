"""Saving models as arrays plus JSON, never pickle."""
import json

import numpy as np
import jax.numpy as jnp
import pytest

import probssm as ps
from test_kalman import random_model


def test_roundtrip_linear_gaussian(tmp_path):
    model = random_model(np.random.default_rng(0), 3, 2, inputs_dim=1)
    ps.save(tmp_path / "fit", model)
    header = json.loads((tmp_path / "fit.json").read_text())
    assert header["format"] == "probssm-model-v1"
    loaded = ps.load(tmp_path / "fit")
    assert type(loaded) is type(model)
    for name in ("transition_matrix", "emission_cov", "transition_input_matrix", "emission_offset"):
        np.testing.assert_array_equal(np.asarray(getattr(model, name)), np.asarray(getattr(loaded, name)))
    y, u = np.ones((5, 2)), np.ones((5, 1))
    assert float(ps.kalman.filter(loaded, y, inputs=u).log_likelihood) == float(
        ps.kalman.filter(model, y, inputs=u).log_likelihood)


def test_functions_need_like(tmp_path):
    f = lambda z, t, u: 0.9 * z
    h = lambda z, t, u: z
    model = ps.models.NonlinearGaussianSSM(jnp.zeros(1), jnp.eye(1), f, 2.0 * jnp.eye(1), h, jnp.eye(1))
    ps.save(tmp_path / "nl", model)
    with pytest.raises(ValueError, match="like"):
        ps.load(tmp_path / "nl")
    template = ps.models.NonlinearGaussianSSM(jnp.ones(1), jnp.eye(1), f, jnp.eye(1), h, jnp.eye(1))
    loaded = ps.load(tmp_path / "nl", like=template)
    np.testing.assert_array_equal(np.asarray(loaded.transition_cov), 2.0 * np.eye(1))
    np.testing.assert_array_equal(np.asarray(loaded.initial_mean), np.zeros(1))
    assert loaded.transition_fn is f
