"""The two-level parallel forward-backward (the CPU default of ``parallel=True``) against the
sequential one: time-varying transitions, padding (the length ending inside a chunk, at a
chunk's last step and at its first), missing data, float32 on a long sequence; and no
re-tracing for new data of the same shape."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

import probssm as ps
from probssm.core.protocol import DiscreteParams
from probssm.inference import forward_backward as fb
from probssm.inference import hmm as hmm_engine


def random_params(rng, T, K, time_varying):
    pi = rng.dirichlet(np.ones(K))
    shape = (T, K, K) if time_varying else (K, K)
    A = rng.dirichlet(np.ones(K), size=shape[:-1])
    ll = rng.normal(size=(T, K)) * 3.0
    return DiscreteParams(jnp.asarray(pi), jnp.asarray(A), jnp.asarray(ll))


@pytest.mark.parametrize("time_varying", [False, True])
@pytest.mark.parametrize("T,length", [(1, None), (50, None), (333, 200), (333, 198), (333, 199)])
def test_two_level_equals_sequential(time_varying, T, length):
    rng = np.random.default_rng(T + 7 * time_varying)
    params = random_params(rng, T, 4, time_varying)
    n = None if length is None else jnp.asarray(length)
    seq = ps.hmm.smoother_params(params, length=n)
    par = ps.hmm.smoother_params(params, length=n, parallel=True, chunk_size=fb.TWO_LEVEL)
    for a, b in zip(seq, par):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-10, atol=1e-12)


def test_two_level_float32_long_sequence():
    rng = np.random.default_rng(3)
    params = random_params(rng, 20_000, 5, False)
    ll64 = float(ps.hmm.filter_params(params).log_likelihood)
    p32 = DiscreteParams(*(a.astype(jnp.float32) for a in params))
    r = ps.hmm.smoother_params(p32, parallel=True, chunk_size=fb.TWO_LEVEL)
    assert r.log_likelihood.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(r.smoothed_probs)))
    # 20000 float32 terms of size ~1: relative 1e-4 is ~100 ulp of the sum
    assert abs(float(r.log_likelihood) - ll64) / abs(ll64) < 1e-4
    seq64 = ps.hmm.smoother_params(params)
    np.testing.assert_allclose(np.asarray(r.smoothed_probs), np.asarray(seq64.smoothed_probs), atol=1e-3)


def test_no_retrace_for_new_data_of_the_same_shape():
    rng = np.random.default_rng(5)
    model = ps.models.HMM(np.ones(3) / 3, rng.dirichlet(np.ones(3), size=3),
                          ps.emissions.Gaussian(rng.normal(size=(3, 2)), np.stack([np.eye(2)] * 3)))
    _, y = ps.sample(jax.random.PRNGKey(0), model, 40)
    for parallel in (False, True):
        ps.hmm.smoother(model, y, parallel=parallel)
        before = hmm_engine._run._cache_size()
        ps.hmm.smoother(model, np.asarray(y) + 1.0, parallel=parallel)
        assert hmm_engine._run._cache_size() == before
