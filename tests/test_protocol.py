"""The protocol kept honestly: one parameter spec, one batching helper, learners that see nested
parameters, and a source scan that keeps engines reading declared capabilities only."""
import ast
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import probssm as ps
from probssm.core import batching, params as P

SRC = pathlib.Path(ps.__file__).parent


def gaussian_hmm(means, dtype=jnp.float64):
    K = len(means)
    A = 0.9 * np.eye(K) + 0.1 / (K - 1) * (1 - np.eye(K))
    return ps.models.HMM(jnp.full(K, 1.0 / K, dtype), jnp.asarray(A, dtype),
                         ps.emissions.Gaussian(jnp.asarray(np.array(means, float)[:, None], dtype),
                                               jnp.ones((K, 1, 1), dtype)))


# ----------------------------------------------------------------------------------------------
# Parameter spec
# ----------------------------------------------------------------------------------------------
def test_param_spec_walks_submodules_and_takes_paths():
    hmm = gaussian_hmm([-1.0, 1.0])
    assert list(P.paths(hmm)) == ["initial_probs", "transition_matrix", "emissions.means", "emissions.covs"]
    assert P.spec(hmm, fixed=("emissions.covs",)).paths == ("initial_probs", "transition_matrix", "emissions.means")
    assert P.spec(hmm, fixed=("emissions",)).paths == ("initial_probs", "transition_matrix")
    with pytest.raises(ValueError, match="fixed"):
        P.spec(hmm, fixed=("emissions.nope",))
    spec = P.spec(hmm)
    back = P.from_unconstrained(hmm, spec, P.to_unconstrained(hmm, spec))
    for a, b in zip(jax.tree_util.tree_leaves(hmm), jax.tree_util.tree_leaves(back)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-12)


def test_param_spec_sees_an_equinox_network_inside_a_model():
    mlp = eqx.nn.MLP(1, 1, 3, 1, key=jax.random.PRNGKey(0))
    model = ps.models.NonlinearGaussianSSM(jnp.zeros(1), jnp.eye(1), lambda z, t, u: mlp(z), 0.1 * jnp.eye(1),
                                           lambda z, t, u: z, jnp.eye(1))
    net = ps.models.NonlinearGaussianSSM(jnp.zeros(1), jnp.eye(1), _Net(mlp), 0.1 * jnp.eye(1),
                                         lambda z, t, u: z, jnp.eye(1))
    assert "transition_fn.mlp.layers.0.weight" in P.paths(net)
    assert not any(p.startswith("transition_fn") for p in P.paths(model))  # a plain function has no arrays


class _Net(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, z, t, u):
        return self.mlp(z)


# ----------------------------------------------------------------------------------------------
# Batching helper
# ----------------------------------------------------------------------------------------------
def test_batching_reads_lists_and_never_guesses_from_equal_sizes():
    b = batching.as_batch([np.ones((3, 2)), np.ones((5, 2))])
    assert b.emissions.shape == (2, 5, 2) and b.batched
    np.testing.assert_array_equal(np.asarray(b.lengths), [3, 5])
    assert np.isnan(np.asarray(b.emissions[0, 3:])).all()
    y = np.zeros((4, 4, 1))                   # B == T == 4
    assert batching.as_batch(y, np.zeros((4, 4, 2))).inputs_batched   # (B, T, U): per sequence
    assert not batching.as_batch(y, np.zeros((4, 2))).inputs_batched  # (T, U): shared
    with pytest.raises(ValueError, match="inputs"):
        batching.as_batch(np.zeros((3, 1)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="lengths"):
        batching.as_batch(y, lengths=np.array([1, 2, 3, 9]))
    assert batching.as_batch(np.zeros(5)).emissions.shape == (5, 1)  # a 1-D series: one emission dimension
    with pytest.raises(ValueError, match="emissions"):
        batching.as_batch(np.zeros((2, 2, 2, 2)))


# ----------------------------------------------------------------------------------------------
# Learners see nested parameters
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def long_hmm_data():
    truth = gaussian_hmm([-2.0, 2.0])
    _, y = ps.sample(jax.random.PRNGKey(0), truth, 5000)
    return truth, y


def test_mle_on_a_gaussian_hmm_fits_emission_means_and_equals_baum_welch(long_hmm_data):
    """Regression: the learner once walked top-level fields only and left the means at the start."""
    truth, y = long_hmm_data
    start = gaussian_hmm([-0.5, 0.5])
    fit, history = ps.learn.mle(start, y, 150, progress=False)
    means = np.sort(np.asarray(fit.emissions.means)[:, 0])
    np.testing.assert_allclose(means, [-2.0, 2.0], atol=0.05)
    bw, bw_history = ps.learn.baum_welch(start, y, 300, progress=False)
    ll_mle = float(ps.hmm.log_likelihood(fit, y))
    ll_bw = float(ps.hmm.log_likelihood(bw, y))
    # Both reach the same maximum of the likelihood (EM creeps; the gradient fit converges quadratically).
    assert abs(ll_mle - ll_bw) < 1e-6 * abs(ll_bw)
    for a, b in [(fit.emissions.means, bw.emissions.means), (fit.emissions.covs, bw.emissions.covs),
                 (fit.transition_matrix, bw.transition_matrix)]:
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-3)
    # Holding the emissions fixed by a path keeps them (the start is untouched too).
    held, _ = ps.learn.mle(start, y[:500], 5, fixed=("emissions",), progress=False)
    np.testing.assert_array_equal(np.asarray(held.emissions.means), np.asarray(start.emissions.means))
    np.testing.assert_array_equal(np.asarray(start.emissions.means)[:, 0], [-0.5, 0.5])


# ----------------------------------------------------------------------------------------------
# Source scan: engines read declared capabilities only
# ----------------------------------------------------------------------------------------------
def _modules():
    for path in sorted(SRC.rglob("*.py")):
        yield path, ast.parse(path.read_text())


def _concrete_model_classes():
    """Classes defined in probssm/models (the concrete families)."""
    names = set()
    for path in (SRC / "models").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("Abstract"):
                names.add(node.name)
    return names


def test_no_engine_checks_a_concrete_model_class():
    concrete = _concrete_model_classes()
    offenders = []
    for path, tree in _modules():
        if path.is_relative_to(SRC / "models"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
                target = ast.unparse(node.args[0])
                classes = ast.unparse(node.args[1])
                hit = [c for c in concrete if c in classes.replace("(", " ").replace(")", " ").replace(",", " ")
                       .split()]
                if hit and "model" in target:
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno} isinstance({target}, {classes})")
    assert not offenders, offenders


def test_no_capability_getattr_or_hasattr():
    offenders = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr"):
                if len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and "model" in ast.unparse(
                        node.args[0]):
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno} {ast.unparse(node)}")
    assert not offenders, offenders


def _module_name(path):
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def test_no_cross_module_private_import():
    offenders = []
    for path, tree in _modules():
        me = _module_name(path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("probssm"):
                if node.module != me and any(part.startswith("_") for part in node.module.split(".")):
                    offenders.append(f"{me}:{node.lineno} from {node.module}")
                for alias in node.names:
                    if alias.name.startswith("_") and node.module != me:
                        offenders.append(f"{me}:{node.lineno} from {node.module} import {alias.name}")
        # ``module._name`` on another probssm module bound by an import in this file
        bound = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("probssm"):
                bound |= {a.asname or a.name for a in node.names if (SRC.parent / f"{node.module}.{a.name}"
                          .replace(".", "/")).with_suffix(".py").exists() or (SRC.parent / f"{node.module}.{a.name}"
                          .replace(".", "/")).is_dir()}
            elif isinstance(node, ast.Import):
                bound |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("probssm")}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                offenders.append(f"{me}:{node.lineno} {node.value.id}.{node.attr}")
    assert not offenders, offenders


def test_import_graph_has_no_cycle():
    """Imports between probssm modules (deferred ones inside functions included) form no cycle,
    apart from a package's ``__init__`` re-exporting its own submodules."""
    names = {_module_name(p): p for p, _ in _modules()}
    graph = {m: set() for m in names}
    for m, path in names.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("probssm"):
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in names else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("probssm")]
            for t in targets:
                if t in graph and t != m and not t.startswith(m + "."):
                    graph[m].add(t)
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    # A package __init__ that re-exports a submodule which imports a sibling through the package is
    # not a cycle of code; only report cycles between plain modules.
    real = [c for c in cycles if not any(names[x].name == "__init__.py" for x in c)]
    assert not real, real[:5]
