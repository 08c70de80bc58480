"""HMM-GLM input-driven transitions and trials of different lengths (issue 4): path enumeration,
scipy's optimum of the transition M-step, recovery within standard errors, padding."""
import itertools

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import probssm as ps
from probssm.datasets import sample_hmmglm
from probssm.models.hmmglm import HMMGLM
from probssm.learn.hmmglm_em import fit_hmmglm, hmmglm_log_likelihood, init_hmmglm


# ----------------------------------------------------------------------------------------------
# Input-driven transitions: p(z_t = j | z_{t-1} = i, u_t) proportional to A_ij exp(r_j . u_t)
# ----------------------------------------------------------------------------------------------
def _input_driven_model(rng, K, N, U, strength=0.0):
    A = 0.8 * np.eye(K) + 0.2 / K
    v = np.zeros((K, N, U))
    v[:, :, 0] = strength * np.linspace(-1, 1, K)[:, None]  # states answer u_1 with opposite signs
    return HMMGLM(np.ones(K) / K, A, np.full(N, -0.5), 0.2 * rng.normal(size=(K, N, N, 1)), v,
                  transition_input_weights=rng.normal(size=(K, U)))


def _numpy_transitions(A, R, u):
    """(T, K, K) p(z_t = j | z_{t-1} = i, u_t), written out directly."""
    logits = np.log(A)[None] + (u @ R.T)[:, None, :]
    P = np.exp(logits - logits.max(-1, keepdims=True))
    return P / P.sum(-1, keepdims=True)


def test_input_driven_transitions_match_path_enumeration():
    """log p(y) and the transition objective Q_trans (computed from gamma and summed xi only)
    equal their definitions summed over all K^T paths."""
    from probssm.learn.hmmglm_em import transition_objective
    rng = np.random.default_rng(11)
    K, N, U, T = 3, 2, 2, 5
    model = _input_driven_model(rng, K, N, U, strength=1.0)
    y = rng.poisson(0.8, (T, N)).astype(float)
    u = rng.normal(size=(T, U))
    P = _numpy_transitions(np.asarray(model.transition_matrix), np.asarray(model.transition_input_weights), u)
    ll = np.asarray(model.discrete_params(jnp.asarray(y), jnp.asarray(u)).log_likelihoods)
    joint, q_paths = [], []
    for path in itertools.product(range(K), repeat=T):
        lp = np.log(1.0 / K) + ll[0, path[0]]
        q = sum(np.log(P[t, path[t - 1], path[t]]) for t in range(1, T))
        joint.append(lp + q + sum(ll[t, path[t]] for t in range(1, T)))
        q_paths.append(q)
    joint = np.asarray(joint)
    log_py = np.logaddexp.reduce(joint)
    post = ps.hmm.smoother(model, y, inputs=u)
    np.testing.assert_allclose(float(post.log_likelihood), log_py, rtol=1e-12)
    expected_q = np.sum(np.exp(joint - log_py) * np.asarray(q_paths))
    got_q = transition_objective(model, post.smoothed_probs, post.transition_counts, u)
    np.testing.assert_allclose(float(got_q), expected_q, rtol=1e-10)
    # R = 0 is the fixed-matrix model
    fixed = HMMGLM(model.initial_probs, model.transition_matrix, model.biases, model.weights, model.input_weights)
    zero = HMMGLM(model.initial_probs, model.transition_matrix, model.biases, model.weights, model.input_weights,
                  transition_input_weights=np.zeros((K, U)))
    np.testing.assert_allclose(float(ps.hmm.log_likelihood(zero, y, inputs=u)),
                               float(ps.hmm.log_likelihood(fixed, y, inputs=u)), rtol=1e-12)


def test_input_driven_transition_m_step_matches_scipy():
    """The Newton M-step reaches the maximum of Q_trans found by scipy's BFGS on a numpy version."""
    from scipy.optimize import minimize
    from probssm.learn.hmmglm_transitions import transition_m_step
    rng = np.random.default_rng(12)
    K, N, U, T, M = 3, 2, 2, 60, 3
    model = _input_driven_model(rng, K, N, U, strength=1.0)
    u = rng.normal(size=(M, T, U))
    y = rng.poisson(0.8, (M, T, N)).astype(float)
    post = jax.vmap(lambda a, b: ps.hmm.posterior(model, a, b))(jnp.asarray(y), jnp.asarray(u))
    gamma, counts = np.asarray(post.smoothed_probs), np.asarray(post.transition_counts).sum(0)

    def neg_q(theta):
        log_A, R = theta[:K * K].reshape(K, K), theta[K * K:].reshape(K, U)
        logits = log_A[None, None] + (u[:, 1:] @ R.T)[:, :, None, :]
        lse = np.logaddexp.reduce(logits, axis=-1)
        return -(np.sum(counts * log_A) + np.sum(gamma[:, 1:] * (u[:, 1:] @ R.T)) - np.sum(gamma[:, :-1] * lse))

    ref = minimize(neg_q, np.zeros(K * K + K * U), method="BFGS", options={"gtol": 1e-9})
    A, R = transition_m_step(model, ("transition_matrix", "transition_input_weights"), post.smoothed_probs,
                              jnp.asarray(counts), jnp.asarray(u))
    ours = np.concatenate([np.log(np.asarray(A)).ravel(), np.asarray(R).ravel()])
    np.testing.assert_allclose(-neg_q(ours), -ref.fun, rtol=1e-9)
    # identifiable parts: log A up to a shift per row, R up to a shift shared by the states
    centre = lambda th: np.concatenate([(th[:K * K].reshape(K, K) - th[:K * K].reshape(K, K).mean(1, keepdims=True)).ravel(),
                                        (th[K * K:].reshape(K, U) - th[K * K:].reshape(K, U).mean(0)).ravel()])
    np.testing.assert_allclose(centre(ours), centre(ref.x), atol=1e-4)


def test_input_driven_fit_recovers_transition_weights():
    """EM with input-driven transitions: the objective never decreases, and the fitted contrasts
    r_1 - r_0 lie within 4 standard errors (observed information of log p(y) in R) of the truth."""
    rng = np.random.default_rng(13)
    K, N, U, T, M = 2, 3, 2, 300, 8
    truth = _input_driven_model(rng, K, N, U, strength=2.0)
    truth = HMMGLM(truth.initial_probs, np.array([[0.95, 0.05], [0.05, 0.95]]), truth.biases, truth.weights,
                   truth.input_weights, transition_input_weights=np.array([[0.0, 0.0], [1.5, -1.0]]))
    u = rng.normal(size=(M, T, U))
    _, y = sample_hmmglm(jax.random.PRNGKey(3), truth, T, M, inputs=u)
    start = init_hmmglm(jax.random.PRNGKey(4), y, K, num_inputs=U, input_driven_transitions=True, stickiness=0.9)
    start = HMMGLM(start.initial_probs, start.transition_matrix, start.biases, start.weights,
                   np.asarray(truth.input_weights) * 0.5, transition_input_weights=np.zeros((K, U)))
    fitted, history = fit_hmmglm(start, y, 60, inputs=u, progress=False)
    h = np.asarray(history)
    assert np.all(np.diff(h) >= -1e-9 * abs(h).max())
    # observed information of log p(y) in all free parameters: row-logit contrasts of A, the
    # contrast c = r_1 - r_0 (a shift shared by the states changes nothing), biases, weights
    f = fitted
    log_A = np.log(np.asarray(f.transition_matrix))
    shapes = [f.biases.shape, f.weights.shape, f.input_weights.shape]
    theta = np.concatenate([[log_A[0, 1] - log_A[0, 0], log_A[1, 0] - log_A[1, 1]],
                            np.asarray(f.transition_input_weights[1] - f.transition_input_weights[0]),
                            np.asarray(f.biases), np.asarray(f.weights).ravel(), np.asarray(f.input_weights).ravel()])

    def loglik(th):
        A = jnp.stack([jax.nn.softmax(jnp.stack([0.0, th[0]])), jax.nn.softmax(jnp.stack([th[1], 0.0]))])
        R = jnp.stack([jnp.zeros(U), th[2:4]])
        parts, o = [], 4
        for shape in shapes:
            size = int(np.prod(shape))
            parts.append(th[o:o + size].reshape(shape))
            o += size
        m = HMMGLM(f.initial_probs, A, *parts, transition_input_weights=R)
        return jnp.sum(jax.vmap(lambda a, b: ps.hmm.log_likelihood(m, a, inputs=b))(y, jnp.asarray(u)))

    grad = jax.jit(jax.grad(loglik))
    assert np.max(np.abs(np.asarray(grad(jnp.asarray(theta))))) < 1e-2  # a stationary point
    # Hessian by central differences of the exact gradient (compiles far faster than jax.hessian)
    h = 1e-5
    H = np.stack([(np.asarray(grad(jnp.asarray(theta + h * e))) - np.asarray(grad(jnp.asarray(theta - h * e)))) / (2 * h)
                  for e in np.eye(theta.size)], 1)
    se = np.sqrt(np.diag(np.linalg.inv(-(H + H.T) / 2)))[2:4]
    contrast = theta[2:4] if float(f.input_weights[1, 0, 0]) > float(f.input_weights[0, 0, 0]) else -theta[2:4]
    assert np.all(se < 0.3)  # the data pin the contrasts down (a test that can fail)
    assert np.all(np.abs(contrast - np.array([1.5, -1.0])) < 4 * se), (contrast, se)


def test_input_driven_bad_input():
    rng = np.random.default_rng(14)
    with pytest.raises(ValueError, match="transition_input_weights"):
        HMMGLM(np.ones(2) / 2, np.eye(2), np.zeros(3), np.zeros((2, 3, 3, 1)), np.zeros((2, 3, 2)),
               transition_input_weights=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="num_inputs"):
        HMMGLM.create(jax.random.PRNGKey(0), 2, 3, input_driven_transitions=True)
    model = _input_driven_model(rng, 2, 3, 2)
    with pytest.raises(ValueError, match="inputs"):
        ps.hmm.filter(model, np.zeros((10, 3)))
    with pytest.raises(ValueError, match="fixed"):
        fit_hmmglm(HMMGLM.create(jax.random.PRNGKey(0), 2, 3), np.zeros((10, 3)), 1,
                   fixed=("transition_input_weights",))


def test_padded_trials_with_lengths_equal_the_cut_trials():
    """Trials of different lengths padded with NaN: log-likelihoods equal those of the cut trials,
    and a fit (input-driven transitions, so the transition objective's masking is exercised)
    equals the fit on the trials cut to their common length."""
    rng = np.random.default_rng(15)
    K, N, U, T = 2, 3, 1, 40
    model = _input_driven_model(rng, K, N, U, strength=1.0)
    u = rng.normal(size=(3, T, U))
    _, y = sample_hmmglm(jax.random.PRNGKey(5), model, T, 3, inputs=u)
    y = np.asarray(y).copy()
    lengths = np.array([40, 25, 31])
    padded = y.copy()
    for m, n in enumerate(lengths):
        padded[m, n:] = np.nan
    ll = np.asarray(hmmglm_log_likelihood(model, padded, inputs=u, lengths=lengths))
    cut = [float(hmmglm_log_likelihood(model, y[m, :n], inputs=u[m, :n])) for m, n in enumerate(lengths)]
    np.testing.assert_allclose(ll, cut, rtol=1e-12)

    same = np.array([30, 30, 30])
    padded = y.copy()
    padded[:, 30:] = np.nan
    kw = dict(inputs=None, progress=False, learning_rate=0.02, num_m_steps=10)
    a, ha = fit_hmmglm(model, padded, 5, lengths=same, **{**kw, "inputs": u})
    b, hb = fit_hmmglm(model, y[:, :30], 5, **{**kw, "inputs": u[:, :30]})
    np.testing.assert_allclose(np.asarray(ha), np.asarray(hb), rtol=1e-10)
    for name in ("transition_matrix", "transition_input_weights", "weights", "biases", "input_weights"):
        np.testing.assert_allclose(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)), atol=1e-8)
    with pytest.raises(ValueError, match="lengths"):
        hmmglm_log_likelihood(model, y, inputs=u, lengths=[40, 41, 3])
