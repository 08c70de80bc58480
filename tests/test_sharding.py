"""Batches and particle populations sharded over devices with `ps.sharding` (issue 16, item 5).

The multi-device checks run in a subprocess with 8 forced CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``) and ``JAX_ENABLE_X64=1``, so this pytest
process keeps its own device setup. The subprocess is this file run as a script: it computes every
engine on unsharded inputs (one device) and on inputs sharded over the 8 devices, and prints one
JSON line of the largest differences and of how the outputs are laid out; the tests read it.
"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

NUM_DEVICES = 8
ROOT = pathlib.Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# The subprocess side
# ----------------------------------------------------------------------------------------------
def _layout(x, mesh_axis="batch", axis=0):
    """How a result array is spread: its spec, the devices it lives on and the rows each holds."""
    import jax

    spec = tuple(x.sharding.spec) if hasattr(x.sharding, "spec") else None
    shards = x.addressable_shards
    return {"spec": [s if s is None or isinstance(s, str) else list(s) for s in (spec or ())],
            "devices": len({s.device for s in shards}), "rows": sorted({int(s.data.shape[axis]) for s in shards}),
            "global": int(x.shape[axis]) if x.ndim > axis else None, "num_devices": jax.device_count()}


def _diff(a, b):
    import jax

    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    return max(float(np.max(np.abs(np.asarray(x, float) - np.asarray(y, float)), initial=0.0)) for x, y in zip(la, lb))


def _checks(which: str) -> dict:
    import jax
    import jax.numpy as jnp

    import probssm as ps

    assert jax.device_count() == NUM_DEVICES and jax.config.jax_enable_x64
    mesh = ps.sharding.batch_mesh()
    rng = np.random.default_rng(0)
    out = {}
    lgssm = ps.models.LinearGaussianSSM(jnp.zeros(2), jnp.eye(2), jnp.array([[0.9, 0.1], [0.0, 0.8]]),
                                        0.1 * jnp.eye(2), jnp.array([[1.0, 0.5]]), 0.5 * jnp.eye(1))
    B, T = 16, 10
    y = rng.normal(size=(B, T, 1))
    y[3, 4] = np.nan  # a missing value
    lengths = rng.integers(3, T + 1, size=B).astype(np.int32)

    if which == "slow":  # EM on a linear-Gaussian batch: the heaviest compilation, run under make test-all
        ys = ps.sharding.shard_batch(y[:8], mesh)
        f0, h0 = ps.learn.em(lgssm, y[:8], 2, progress=False)
        f1, h1 = ps.learn.em(lgssm, ys, 2, progress=False)
        out["em_lgssm"] = {"err": max(_diff(h0, h1), _diff(f0, f1))}
        return out

    # Kalman filter and smoother on 16 ragged sequences (2 per device)
    ys, ns = ps.sharding.shard_batch((y, lengths), mesh)
    out["inputs"] = _layout(ys)
    f0, f1 = ps.kalman.filter(lgssm, y, lengths=lengths), ps.kalman.filter(lgssm, ys, lengths=ns)
    out["kalman_filter"] = {"err": _diff(f0, f1), "layout": _layout(f1.filtered_means),
                            "ll_layout": _layout(f1.log_likelihood)}
    s0, s1 = ps.kalman.smoother(lgssm, y, lengths=lengths), ps.kalman.smoother(lgssm, ys, lengths=ns)
    out["kalman_smoother"] = {"err": _diff(s0, s1), "layout": _layout(s1.smoothed_means)}

    # pad=True: a batch of 10 padded to 16, trimmed back
    yp = ps.sharding.shard_batch(y[:10], mesh, pad=True)
    sp = ps.sharding.unpad(ps.kalman.smoother(lgssm, yp), 10)
    out["kalman_padded"] = {"err": _diff(ps.kalman.smoother(lgssm, y[:10]), sp), "padded": int(yp.shape[0]),
                            "trimmed": int(sp.smoothed_means.shape[0])}
    try:
        ps.sharding.shard_batch(y[:10], mesh)
        out["indivisible_error"] = ""
    except ValueError as e:
        out["indivisible_error"] = str(e)

    # HMM smoother on a ragged list, read like the engines read it (shard_sequences)
    hmm = ps.models.HMM(jnp.full(3, 1 / 3), jnp.asarray(0.8 * np.eye(3) + 0.2 / 3),
                        ps.emissions.Gaussian(jnp.asarray([[-1.0], [0.0], [1.0]]), jnp.ones((3, 1, 1))))
    seqs = [rng.normal(size=(int(n), 1)) for n in rng.integers(4, 9, size=8)]
    sb = ps.sharding.shard_sequences(seqs, mesh)
    r0, r1 = ps.hmm.smoother(hmm, seqs), ps.hmm.smoother(hmm, sb.emissions, lengths=sb.lengths)
    out["hmm_smoother"] = {"err": _diff(r0, r1), "layout": _layout(r1.smoothed_probs)}

    # EM (Baum-Welch) on a batch of 8 HMM sequences: pooled parameters come back replicated
    y8 = ps.sharding.shard_batch(y[:8], mesh)
    e0, h0 = ps.learn.em(hmm, y[:8], 3, progress=False)
    e1, h1 = ps.learn.em(hmm, y8, 3, progress=False)
    out["em_hmm"] = {"err": max(_diff(h0, h1), _diff(e0, e1)),
                     "replicated": bool(e1.transition_matrix.sharding.is_fully_replicated)}

    # HMM-GLM: per-trial log-likelihoods and a short generalised-EM fit over 8 trials
    glm = ps.models.HMMGLM.create(jax.random.PRNGKey(0), num_states=2, num_neurons=3)
    _, spikes = ps.datasets.sample_hmmglm(jax.random.PRNGKey(1), glm, 12, num_trials=8)
    spikes_s = ps.sharding.shard_batch(spikes, mesh)
    l0, l1 = ps.learn.hmmglm_log_likelihood(glm, spikes), ps.learn.hmmglm_log_likelihood(glm, spikes_s)
    out["hmmglm_loglik"] = {"err": _diff(l0, l1), "layout": _layout(l1)}
    g0, gh0 = ps.learn.fit_hmmglm(glm, spikes, 2, num_m_steps=3, progress=False)
    g1, gh1 = ps.learn.fit_hmmglm(glm, spikes_s, 2, num_m_steps=3, progress=False)
    out["hmmglm_fit"] = {"err": max(_diff(gh0, gh1), _diff(g0, g1))}

    # Particle filter: a batch of sequences sharded, the same key
    key = jax.random.PRNGKey(3)
    p0, p1 = ps.smc.particle_filter(key, lgssm, y[:8], 16), ps.smc.particle_filter(key, lgssm, y8, 16)
    out["particle_filter_batch"] = {"err": _diff(p0, p1), "layout": _layout(p1.particles)}

    # Particle filter: one population of 64 particles sharded (8 per device) inside jit
    def run(k):
        r = ps.smc.particle_filter_sequence(k, lgssm, y[0], num_particles=64)
        return r._replace(particles=ps.sharding.shard_particles(r.particles, mesh, axis=1),
                          log_weights=ps.sharding.shard_particles(r.log_weights, mesh, axis=1))

    q0, q1 = ps.smc.particle_filter(key, lgssm, y[0], 64), jax.jit(run)(key)
    hlo = jax.jit(run).lower(key).compile().as_text()
    out["particle_filter_particles"] = {"err": _diff(q0, q1), "layout": _layout(q1.particles, axis=1),
                                        "per_device_shapes_in_hlo": "f64[8,2]" in hlo}

    # gather brings a sharded result back as numpy
    g = ps.sharding.gather(f1.filtered_means)
    out["gather"] = {"numpy": isinstance(g, np.ndarray), "err": _diff(g, f0.filtered_means)}
    return out


def _multihost(process_id: int, num_processes: int, port: int, full: int) -> dict:
    """One of ``num_processes`` processes (2 CPU devices each) joined by `jax.distributed`: each loads
    its own slice of the batch, the engines run on the global arrays, `gather` brings results back;
    every process compares with the engines run on the whole batch on its own devices only. ``full``:
    all four engines (make test-all), else a smoother and a learner (keeps the module under a minute)."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=num_processes, process_id=process_id)
    import jax.numpy as jnp

    import probssm as ps

    mesh = ps.sharding.batch_mesh()
    B, T = 4 * num_processes, 8
    y = np.random.default_rng(0).normal(size=(B, T, 1))
    lengths = np.arange(B, dtype=np.int32) % 4 + 5
    rows = slice(4 * process_id, 4 * process_id + 4)
    yg, ng = ps.sharding.from_process_local((y[rows], lengths[rows]), mesh)
    lgssm = ps.models.LinearGaussianSSM(jnp.zeros(2), jnp.eye(2), 0.9 * jnp.eye(2), 0.1 * jnp.eye(2),
                                        jnp.ones((1, 2)), 0.5 * jnp.eye(1))
    hmm = ps.models.HMM(jnp.full(3, 1 / 3), jnp.asarray(0.8 * np.eye(3) + 0.2 / 3),
                        ps.emissions.Gaussian(jnp.asarray([[-1.0], [0.0], [1.0]]), jnp.ones((3, 1, 1))))
    key = jax.random.PRNGKey(3)
    runs = {
        "kalman_smoother": lambda a, n: ps.kalman.smoother(lgssm, a, lengths=n),
        "hmm_smoother": lambda a, n: ps.hmm.smoother(hmm, a, lengths=n),
        "em_hmm": lambda a, n: ps.learn.em(hmm, a, 2, lengths=n, progress=False),
        "particle_filter": lambda a, n: ps.smc.particle_filter(key, lgssm, a, 8, lengths=n),
    }
    if not full:
        runs = {k: runs[k] for k in ("kalman_smoother", "em_hmm")}
    out = {"processes": jax.process_count(), "devices": jax.device_count(),
           "local_rows": sorted(ps.sharding.local_batch_sizes(yg).values())}
    for name, fn in runs.items():
        out[name] = _diff(ps.sharding.gather(fn(yg, ng)), fn(y, lengths))
    jax.distributed.shutdown()
    return out


# ----------------------------------------------------------------------------------------------
# The pytest side
# ----------------------------------------------------------------------------------------------
def _xla_flags(num_devices: int) -> str:
    """This process's XLA flags (tests/conftest.py's compile settings) with ``num_devices`` CPU devices."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
    return " ".join(kept + [f"--xla_force_host_platform_device_count={num_devices}"])


def _run(which: str) -> dict:
    env = dict(os.environ, XLA_FLAGS=_xla_flags(NUM_DEVICES), JAX_ENABLE_X64="1",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, __file__, which], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results():
    return _run("fast")


def _sharded(layout, rows):
    assert layout["num_devices"] == NUM_DEVICES
    assert layout["spec"][-1] == "batch", layout
    assert layout["devices"] == NUM_DEVICES, layout
    assert layout["rows"] == [rows], layout


def test_inputs_are_spread_over_the_devices(results):
    _sharded(results["inputs"], 2)


@pytest.mark.parametrize("name, rows", [("kalman_filter", 2), ("kalman_smoother", 2), ("hmm_smoother", 1),
                                        ("hmmglm_loglik", 1), ("particle_filter_batch", 1)])
def test_per_sequence_engines_match_one_device_and_stay_sharded(results, name, rows):
    r = results[name]
    assert r["err"] <= 1e-10, r
    _sharded(r["layout"], rows)


def test_kalman_log_likelihood_is_sharded_per_sequence(results):
    _sharded(results["kalman_filter"]["ll_layout"], 2)


def test_learners_match_one_device(results):
    assert results["em_hmm"]["err"] <= 1e-10
    assert results["em_hmm"]["replicated"], "pooled EM parameters should come back replicated"
    assert results["hmmglm_fit"]["err"] <= 1e-10


def test_particle_population_sharded_inside_jit(results):
    r = results["particle_filter_particles"]
    assert r["err"] <= 1e-10, r
    _sharded(r["layout"], 8)
    assert r["per_device_shapes_in_hlo"], "the partitioner did not split the particle population"


def test_padding_and_indivisible_batch(results):
    r = results["kalman_padded"]
    assert r["err"] <= 1e-10 and r["padded"] == 16 and r["trimmed"] == 10
    msg = results["indivisible_error"]
    assert "tree" in msg and "10" in msg and "multiple" in msg and "pad=True" in msg


def test_gather_returns_numpy(results):
    assert results["gather"]["numpy"] and results["gather"]["err"] <= 1e-10


@pytest.mark.parametrize("full", [pytest.param(0, id="smoother+em"), pytest.param(1, id="all", marks=pytest.mark.slow)])
def test_several_processes_with_jax_distributed(full):
    """Two processes on localhost (2 CPU devices each), as two hosts would run the same script."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS=_xla_flags(2), JAX_ENABLE_X64="1",
               JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, __file__, "multihost", str(i), "2", str(port), str(full)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=300)
        finally:
            if p.poll() is None:
                p.kill()
        assert p.returncode == 0, stderr[-4000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    for r in outs:
        assert r["processes"] == 2 and r["devices"] == 4 and r["local_rows"] == [2, 2], r
        names = ("kalman_smoother", "hmm_smoother", "em_hmm", "particle_filter") if full else ("kalman_smoother",
                                                                                               "em_hmm")
        for name in names:
            assert r[name] <= 1e-10, (name, r)


@pytest.mark.slow
def test_em_on_a_linear_gaussian_batch_matches_one_device():
    assert _run("slow")["em_lgssm"]["err"] <= 1e-10


# ----------------------------------------------------------------------------------------------
# Argument checks (this process: one device)
# ----------------------------------------------------------------------------------------------
def test_argument_checks():
    import jax
    import jax.numpy as jnp

    import probssm as ps

    mesh = ps.sharding.batch_mesh()
    with pytest.raises(ValueError, match="devices: expected at least one"):
        ps.sharding.batch_mesh([])
    with pytest.raises(ValueError, match=r"devices\[0\]: expected a jax.Device"):
        ps.sharding.batch_mesh(["cpu"])
    with pytest.raises(ValueError, match="axis_name: expected a non-empty string"):
        ps.sharding.batch_mesh(axis_name="")
    with pytest.raises(ValueError, match="mesh: expected a jax.sharding.Mesh"):
        ps.sharding.shard_batch(jnp.zeros((2, 3, 1)), "gpu")
    with pytest.raises(ValueError, match="axis_name: expected one of the mesh axes"):
        ps.sharding.shard_batch(jnp.zeros((2, 3, 1)), mesh, axis_name="time")
    with pytest.raises(ValueError, match=r"tree\[1\]: expected batch size 2"):
        ps.sharding.shard_batch((jnp.zeros((2, 3, 1)), jnp.ones(3, jnp.int32)), mesh)
    with pytest.raises(ValueError, match=r"tree: expected an array with a batch axis 0"):
        ps.sharding.shard_batch(jnp.float32(1.0), mesh)
    with pytest.raises(ValueError, match="emissions: expected a batch"):
        ps.sharding.shard_sequences(jnp.zeros((5, 1)), mesh)
    with pytest.raises(ValueError, match="batch_size: expected a positive int"):
        ps.sharding.unpad(jnp.zeros(3), 0)
    with pytest.raises(ValueError, match=r"tree: expected an array with a particle axis 1"):
        ps.sharding.shard_particles(jnp.zeros(4), mesh, axis=1)
    # one device: placing is the identity on values, and works under jit too
    y = jnp.arange(6.0).reshape(2, 3, 1)
    np.testing.assert_array_equal(ps.sharding.shard_batch(y, mesh), y)
    np.testing.assert_array_equal(jax.jit(lambda a: ps.sharding.shard_batch(a, mesh))(y), y)
    np.testing.assert_array_equal(ps.sharding.from_process_local(y, mesh), y)
    assert ps.sharding.local_batch_sizes(ps.sharding.shard_batch(y, mesh)) == {jax.devices()[0]: 2}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "multihost":
        print(json.dumps(_multihost(*map(int, sys.argv[2:6]))))
    else:
        print(json.dumps(_checks(sys.argv[1] if len(sys.argv) > 1 else "fast")))
