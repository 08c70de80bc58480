# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Switching brain states from simulated spike trains: plain, Gaussian and one-hot HMM-GLMs
#
# The synthetic benchmark of the one-hot HMM-GLM card (MODELS.md; Li et al., ICLR 2024):
# K = 5 hidden states, N = 20 neurons, 50 trials of T = 2000 bins (30 for training, 20 held
# out). A sparse signed connectome C (inhibitory / none / excitatory) is shared by the states;
# each state keeps each connection with probability 0.7 and draws its own strength in [0.6, 1.2].
#
# We fit the three weight priors by generalised EM (`fit_hmmglm`) and report
#
# * **state accuracy**: Viterbi path vs the true states after Hungarian matching (training and test trials);
# * **sign accuracy** of the recovered connectome over the N(N-1) off-diagonal pairs, 3 classes
#   {-, 0, +}, and per state (each matched state's signs against that state's true signs).
#   Nothing is chosen with the truth: the 20 held-out trials are split into 10 validation
#   trials and 10 test trials. The plain and Gaussian models have only real-valued weights;
#   their weights below a threshold are pruned to zero, the threshold being the one whose
#   pruned model scores best on the validation trials (the best threshold in hindsight is
#   shown beside it for reference). The one-hot model says "none" itself (hard indicators):
#   after its EM fit, 30 more iterations charge every connection switched on in a state
#   0.5 log(bins / K) nats, the BIC price of its strength (`prune_links`), which turns the weak
#   spurious links left at the strength floor to "none". Its
#   strength floor (0.1 or 0.3) is picked by the validation log-likelihood, and its connectome
#   is read off by the "consensus" rule (argmax of the states' mean class probabilities) or
#   the "support" rule (connected where any state connects);
# * **test log-likelihood per bin** (hard one-hot indicators at evaluation);
# * times: compile, one EM iteration, the whole fit.
#
# Run: `python examples/brain_states_synthetic.py` (full size, several minutes on 2 cores) or
# `--quick` (smaller, about a minute).

# %%
import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

import probssm as ps
from probssm.learn.hmmglm_em import fit_hmmglm, hmmglm_log_likelihood, init_hmmglm, prune_links
from probssm.models.hmmglm import simulate_hmmglm

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--quick", action="store_true", help="K=3, N=10, T=500, 16 trials (10 train)")
parser.add_argument("--iters", type=int, default=None, help="EM iterations after the restarts")
parser.add_argument("--restarts", type=int, default=3, help="short random restarts per prior (best kept)")
parser.add_argument("--batch-size", type=int, default=6000, help="time bins per Adam step (0 = all)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--sparsity", type=float, default=3.0, help="one-hot connectome hyperprior pseudo-votes for 'none'")
parser.add_argument("--link-cost", default="bic", help="one-hot: nats per connection switched on in a state ('bic' or a number)")
parser.add_argument("--priors", default="none,gaussian,onehot", help="comma-separated priors to fit")
parser.add_argument("--train-trials", type=int, default=None, help="use only this many training trials (data-poor regime)")
args, _ = parser.parse_known_args()

if args.quick:
    K, N, T, M, M_TRAIN, ITERS = 3, 10, 500, 16, 10, args.iters or 40
else:
    K, N, T, M, M_TRAIN, ITERS = 5, 20, 2000, 50, 30, args.iters or 80
if args.train_trials:
    M_TRAIN = min(args.train_trials, M_TRAIN)
RESTART_ITERS = 15
PRUNE_ITERS = 30  # one-hot: EM iterations with the link cost, after the others
BATCH = args.batch_size or None


def matched_accuracy(pred, truth, K):
    conf = np.zeros((K, K))
    np.add.at(conf, (np.ravel(pred), np.ravel(truth)), 1)
    r, c = linear_sum_assignment(-conf)
    return conf[r, c].sum() / np.size(truth), dict(zip(r, c))


def validated_threshold_signs(fitted, y_val, per_state=False, levels=41):
    """Signs of the plain / Gaussian weights thresholded without the truth: weights whose
    magnitude is below a threshold are set to zero, and the threshold (one of ``levels``
    quantiles of the off-diagonal magnitudes, or 0) is the one whose pruned model has the
    highest log-likelihood on the validation trials ``y_val``. ``per_state``: prune each state's
    weights by their own magnitude (else by the state-averaged weight, the connectome).
    Returns (signs (N, N) or (K, N, N), chosen threshold)."""
    W = np.asarray(fitted.weights)  # (K, N, N, J)
    size = W.sum(-1) if per_state else np.broadcast_to(W.sum(-1).mean(0), W.shape[:3])
    diag = np.broadcast_to(np.eye(W.shape[1], dtype=bool), W.shape[:3])
    grid = np.concatenate([[0.0], np.quantile(np.abs(size[~diag]), np.linspace(0, 1, levels))])
    lls = []
    for th in grid:
        keep = diag | (np.abs(size) > th)
        pruned = eqx.tree_at(lambda m: m.weights, fitted, jnp.asarray(W * keep[..., None], W.dtype))
        lls.append(float(hmmglm_log_likelihood(pruned, y_val).sum()))
    th = grid[int(np.argmax(lls))]
    signs = np.sign(size) * (np.abs(size) > th)
    return (signs if per_state else signs[0]), th


def best_threshold_signs(wbar, C, mask):
    """3-class accuracy of sign(wbar) * (|wbar| > thr) at the best thr (oracle)."""
    grid = np.concatenate([[0.0], np.quantile(np.abs(wbar[mask]), np.linspace(0, 1, 201))])
    accs = [((np.sign(wbar) * (np.abs(wbar) > th))[mask] == C[mask]).mean() for th in grid]
    i = int(np.argmax(accs))
    return accs[i], np.sign(wbar) * (np.abs(wbar) > grid[i])


# %% Simulate
t0 = time.perf_counter()
sim = simulate_hmmglm(jax.random.PRNGKey(args.seed), K, N, T, M)
spikes, states = np.asarray(sim.spikes), np.asarray(sim.states)
C = np.asarray(sim.connectome)
M_HELD = M - (30 if not args.quick else 10)  # the held-out trials stay the same whatever --train-trials
y_train, y_test = spikes[:M_TRAIN], spikes[M - M_HELD:]
z_train, z_test = states[:M_TRAIN], states[M - M_HELD:]
# the first half of the held-out trials validates the truth-free choices (pruning threshold of the
# plain / Gaussian weights, strength floor of the one-hot prior); the second half is the test set
y_val, y_test, z_test = y_test[: M_HELD // 2], y_test[M_HELD // 2:], z_test[M_HELD // 2:]
off = ~np.eye(N, dtype=bool)
print(f"simulated {M} trials x {T} bins x {N} neurons in {time.perf_counter() - t0:.1f} s; "
      f"mean count {spikes.mean():.3f}/bin, {int((C[off] != 0).sum())} of {off.sum()} pairs connected")
true_ll = float(hmmglm_log_likelihood(sim.model, y_test).sum()) / (y_test.shape[0] * T)


# %% Fit the three priors
# one-hot: 3 pseudo-states voting "no connection" in the Dirichlet hyperprior of the connectome
# (the one value tried; 0 = a flat prior, which leaves more spurious links per state)
# one-hot: the strength floor (the smallest |weight| the indicators can switch on) is chosen among
# 0.1 and 0.3 by the validation log-likelihood, as the plain models' pruning threshold is
LINK_COST = args.link_cost if args.link_cost == "bic" else float(args.link_cost)
CONFIGS = {"none": ("none", {}), "gaussian": ("gaussian", {}),
           "onehot, floor 0.1": ("onehot", {"sparsity": args.sparsity, "min_strength": 0.1, "link_cost": LINK_COST}),
           "onehot, floor 0.3": ("onehot", {"sparsity": args.sparsity, "min_strength": 0.3, "link_cost": LINK_COST})}
CONFIGS = {n: c for n, c in CONFIGS.items() if c[0] in args.priors.split(",")}

def fit_prior(name, seed):
    prior, options = CONFIGS[name]
    # one-hot: the link cost is charged only once the fit has found the states and their strong links
    # (charged from the start, it keeps links from ever switching on while the states are still mixed)
    options = dict(options)
    link_cost = options.pop("link_cost", 0.0)
    kw = dict(num_m_steps=50, batch_size=BATCH, learning_rate=0.05)
    # timing on a one-iteration fit: the first call compiles, the second only runs
    m0 = init_hmmglm(jax.random.PRNGKey(seed), y_train, K, prior=prior, **options)
    t = time.perf_counter()
    jax.block_until_ready(fit_hmmglm(m0, y_train, 1, key=jax.random.PRNGKey(0), **kw))
    first = time.perf_counter() - t
    t = time.perf_counter()
    jax.block_until_ready(fit_hmmglm(m0, y_train, 1, key=jax.random.PRNGKey(0), **kw))
    one_iter = time.perf_counter() - t
    compile_s = first - one_iter

    t = time.perf_counter()
    best, best_obj, history = None, -np.inf, None
    for r in range(args.restarts):  # short restarts (one compile: same shapes), keep the best
        m = init_hmmglm(jax.random.PRNGKey(seed + 100 * r), y_train, K, prior=prior, **options)
        m, h = fit_hmmglm(m, y_train, RESTART_ITERS, key=jax.random.PRNGKey(r), **kw)
        if float(h[-1]) > best_obj:
            best, best_obj, history = m, float(h[-1]), np.asarray(h)
    fitted, h = fit_hmmglm(best, y_train, ITERS, key=jax.random.PRNGKey(seed + 1), **kw)
    # within one fit_hmmglm call the objective never decreases; the restart boundary is checked too
    diffs = np.diff(np.concatenate([history, np.asarray(h)]))
    if link_cost:  # then prune: the same objective plus the link cost (a new objective, so its own history)
        fitted, h2 = prune_links(fitted, y_train, PRUNE_ITERS, link_cost=link_cost, key=jax.random.PRNGKey(seed + 2), **kw)
        diffs = np.concatenate([diffs, np.diff(np.asarray(h2))])
        h = h2
    jax.block_until_ready(h)
    fit_s = time.perf_counter() - t
    return fitted, diffs / abs(float(h[-1])), dict(compile=compile_s, iteration=one_iter, fit=fit_s)


rows = []
fits = {}
val_ll = {}
for name in CONFIGS:
    prior = CONFIGS[name][0]
    fitted, rel_changes, times = fit_prior(name, args.seed + 1)
    val_ll[name] = float(hmmglm_log_likelihood(fitted, y_val).sum()) / (y_val.shape[0] * T)
    fits[name] = fitted
    acc_tr, perm = matched_accuracy(np.asarray(ps.hmm.viterbi(fitted, y_train)), z_train, K)
    acc_te, _ = matched_accuracy(np.asarray(ps.hmm.viterbi(fitted, y_test)), z_test, K)
    # per-state true signs, fitted states matched to true ones
    order = [perm[r] for r in range(K)]  # fitted state r <-> true state perm[r]
    S_true = np.sign(np.asarray(sim.model.weights).sum(-1))[order]  # (K, N, N), aligned with fitted states
    W_fit = np.asarray(fitted.coupling_weights("hard")).sum(-1)
    per_state_mask = np.broadcast_to(off, W_fit.shape)
    ll = float(hmmglm_log_likelihood(fitted, y_test).sum()) / (y_test.shape[0] * T)
    linked = off & (C != 0)
    common = (acc_tr, acc_te)
    tail = (ll, times["fit"], times["iteration"], times["compile"], rel_changes.min())
    if prior == "onehot":  # no threshold anywhere: the hard indicators say "none" themselves
        state_acc = (np.sign(W_fit)[per_state_mask] == S_true[per_state_mask]).mean()
        for rule in ("consensus", "support"):
            est = np.asarray(fitted.connectome(rule))
            acc = (est[off] == C[off]).mean()
            rows.append((f"{name} ({rule})",) + common + (acc, acc, (est[linked] == C[linked]).mean(),
                                                         state_acc, state_acc) + tail)
    else:
        wbar = W_fit.mean(0)
        est, th = validated_threshold_signs(fitted, y_val)
        est_states, _ = validated_threshold_signs(fitted, y_val, per_state=True)
        oracle_acc, _ = best_threshold_signs(wbar, C, off)
        state_oracle, _ = best_threshold_signs(W_fit, S_true, per_state_mask)
        rows.append((prior,) + common + ((est[off] == C[off]).mean(), oracle_acc, (est[linked] == C[linked]).mean(),
                                         (est_states[per_state_mask] == S_true[per_state_mask]).mean(), state_oracle)
                    + tail)
    print(f"{name:18s} done: fit {times['fit']:.1f} s, validation log-lik / bin {val_ll[name]:.4f}", flush=True)

# %% The table
chosen = max((n for n in CONFIGS if n.startswith("onehot")), key=val_ll.get, default=None)
print(f"\nK={K}, N={N}, T={T}, {M_TRAIN} training / {M_HELD // 2} validation / {len(y_test)} test trials, "
      f"{args.restarts} restarts x {RESTART_ITERS} + {ITERS} EM iterations, 50 Adam steps per M-step, "
      f"one-hot sparsity {args.sparsity:g}, link cost {args.link_cost} over {PRUNE_ITERS} more iterations "
      f"({'all bins' if BATCH is None else f'{BATCH} bins'} per step), {jax.numpy.zeros(1).dtype}")
print(f"test log-lik per bin of the true model: {true_ll:.4f}\n")
print("| prior | state acc (train) | state acc (test) | connectome sign acc | same, oracle threshold "
      "| on true links | per-state sign acc | same, oracle threshold "
      "| test LL / bin | fit time (s) | one EM iter (s) | compile (s) | min rel. change of objective |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r[0]} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.3f} | {r[6]:.3f} | {r[7]:.3f} "
          f"| {r[8]:.4f} | {r[9]:.1f} | {r[10]:.2f} | {r[11]:.2f} | {r[12]:.1e} |")
print("\n(sign accuracy over the off-diagonal pairs, 3 classes. one-hot: hard indicators, no threshold; connectome "
      "by the 'consensus' rule = argmax of the states' mean class probabilities, or the 'support' rule = "
      "connected where any state's hard indicator is, with the states' majority sign. plain / Gaussian: weights "
      "below a threshold pruned to zero, the threshold chosen by the validation log-likelihood of the pruned model "
      "(no truth used); 'oracle threshold' = the best threshold in hindsight, for reference)")
if chosen:
    print(f"one-hot strength floor chosen by the validation log-likelihood: {chosen!r} "
          f"({', '.join(f'{n}: {val_ll[n]:.4f}' for n in CONFIGS if n.startswith('onehot'))} per bin)")
