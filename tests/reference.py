"""Plain numpy references used as independent oracles in the tests."""
import numpy as np


def kalman_filter_numpy(m1, P1, F, b, Q, H, d, R, ys):
    """Textbook covariance-form Kalman filter with per-step parameters (lists indexed by t).

    Missing entries (NaN) are removed from the update by selecting the observed rows.
    Returns (loglik, filtered means, filtered covs, predicted means, predicted covs).
    """
    T = len(ys)
    m, P = np.array(m1, float), np.array(P1, float)
    ll = 0.0
    ms, Ps, mps, Pps = [], [], [], []
    for t in range(T):
        if t > 0:
            m = F[t] @ m + b[t]
            P = F[t] @ P @ F[t].T + Q[t]
        mps.append(m.copy())
        Pps.append(P.copy())
        obs = ~np.isnan(ys[t])
        if obs.any():
            Ht, dt, Rt, yt = H[t][obs], d[t][obs], R[t][np.ix_(obs, obs)], ys[t][obs]
            S = Ht @ P @ Ht.T + Rt
            K = P @ Ht.T @ np.linalg.inv(S)
            r = yt - Ht @ m - dt
            ll += -0.5 * (r @ np.linalg.solve(S, r) + np.linalg.slogdet(2 * np.pi * S)[1])
            m = m + K @ r
            P = P - K @ S @ K.T
        ms.append(m.copy())
        Ps.append(P.copy())
    return ll, np.array(ms), np.array(Ps), np.array(mps), np.array(Pps)


def rts_smoother_numpy(F, ms, Ps, mps, Pps):
    T = len(ms)
    sm, sP = ms.copy(), Ps.copy()
    for t in range(T - 2, -1, -1):
        G = Ps[t] @ F[t + 1].T @ np.linalg.inv(Pps[t + 1])
        sm[t] = ms[t] + G @ (sm[t + 1] - mps[t + 1])
        sP[t] = Ps[t] + G @ (sP[t + 1] - Pps[t + 1]) @ G.T
    return sm, sP


def one_mode(model):
    """The single-mode SLDS with mode 0 of the switching ``model`` and its LinearGaussianSSM (the
    switching engines' one-mode oracle is ps.kalman on the latter)."""
    import probssm as ps

    take = lambda a: np.asarray(a)[:1]
    m = ps.models.SLDS(np.ones(1), np.ones((1, 1)), take(model.initial_means), take(model.initial_covs),
                       take(model.dynamics_matrices), take(model.dynamics_covs), take(model.emission_matrices),
                       take(model.emission_covs), take(model.dynamics_offsets), take(model.emission_offsets))
    lg = ps.models.LinearGaussianSSM(m.initial_means[0], m.initial_covs[0], m.dynamics_matrices[0],
                                     m.dynamics_covs[0], m.emission_matrices[0], m.emission_covs[0],
                                     m.dynamics_offsets[0], m.emission_offsets[0])
    return m, lg
