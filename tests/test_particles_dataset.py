"""`ps.datasets.simulate_interacting_particles`: shapes, determinism, the collision rule, the
distances, argument validation. One small simulation shared by the tests (compiled once)."""
import jax
import numpy as np
import pytest

import probssm as ps

B, T, N = 16, 60, 3


@pytest.fixture(scope="module")
def sim():
    # a larger radius than the default so the small batch has many collisions to check
    return ps.datasets.simulate_interacting_particles(jax.random.key(3), B, T, N, collision_radius=1.0)


def test_shapes_and_dtypes(sim):
    E = N * (N - 1) // 2
    assert sim.observations.shape == sim.positions.shape == (B, T, N, 2)
    assert sim.modes.shape == (B, T, N) and np.issubdtype(sim.modes.dtype, np.integer)
    assert sim.collisions.shape == sim.distances.shape == (B, T, E)
    assert sim.collisions.dtype == bool
    assert np.all(np.isfinite(sim.observations)) and np.all(np.isfinite(sim.distances))


def test_modes_in_range_and_positions_in_box(sim):
    z = np.asarray(sim.modes)
    assert z.min() >= 0 and z.max() <= 2
    assert len(np.unique(z)) == 3
    assert np.all(np.abs(np.asarray(sim.positions)) <= 4.0 + 1e-9)


def test_deterministic_given_key(sim):
    again = ps.datasets.simulate_interacting_particles(jax.random.key(3), B, T, N, collision_radius=1.0)
    for a, b in zip(sim, again):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = ps.datasets.simulate_interacting_particles(jax.random.key(4), B, T, N, collision_radius=1.0)
    assert not np.allclose(np.asarray(sim.positions), np.asarray(other.positions))


def test_distances_are_pairwise_observation_distances(sim):
    y = np.asarray(sim.observations)
    pairs = ps.datasets.particle_pairs(N)
    np.testing.assert_array_equal(pairs, [[0, 1], [0, 2], [1, 2]])
    expected = np.linalg.norm(y[:, :, pairs[:, 0]] - y[:, :, pairs[:, 1]], axis=-1)
    np.testing.assert_allclose(np.asarray(sim.distances), expected, rtol=1e-10, atol=1e-12)


def test_collisions_cause_adoption_by_the_lower_index(sim):
    z, c = np.asarray(sim.modes), np.asarray(sim.collisions)
    x = np.asarray(sim.positions)
    pairs = ps.datasets.particle_pairs(N)
    assert not c[:, 0].any()  # nothing recorded at t = 0
    assert c.sum() >= 10  # the check below has something to check
    true_dist = np.linalg.norm(x[:, :, pairs[:, 0]] - x[:, :, pairs[:, 1]], axis=-1)
    assert np.all(true_dist[c] < 1.0)
    changed = 0
    for b, t, e in zip(*np.nonzero(c)):
        n = pairs[e, 0]
        partners = [m for (k, m), hit in zip(pairs, c[b, t]) if hit and k == n]
        nearest = min(partners, key=lambda m: np.linalg.norm(x[b, t, n] - x[b, t, m]))
        assert z[b, t, n] == z[b, t - 1, nearest]
        changed += z[b, t, n] != z[b, t - 1, n]
    assert changed > 0


def test_refractory_period_and_no_switching():
    sim = ps.datasets.simulate_interacting_particles(jax.random.key(5), 8, 80, 3, collision_radius=1.0,
                                                     refractory_steps=10, switch_prob=0.0)
    z, c = np.asarray(sim.modes), np.asarray(sim.collisions)
    pairs = ps.datasets.particle_pairs(3)
    involved = np.zeros(z.shape, bool)
    for e, (n, m) in enumerate(pairs):
        involved[..., n] |= c[..., e]
        involved[..., m] |= c[..., e]
    # an object in a collision at t is in none during t+1 .. t+10
    for b, t, n in zip(*np.nonzero(involved)):
        assert not involved[b, t + 1:t + 11, n].any()
    # without spontaneous switches a mode changes only at the lower-index object of a collision
    adopter = np.zeros(z.shape, bool)
    for e, (n, _) in enumerate(pairs):
        adopter[..., n] |= c[..., e]
    assert not np.any((z[:, 1:] != z[:, :-1]) & ~adopter[:, 1:])


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_sequences=0), "num_sequences"),
    (dict(num_sequences=2, num_timesteps=1), "num_timesteps"),
    (dict(num_sequences=2, num_objects=1), "num_objects"),
    (dict(num_sequences=2, dt=0.0), "dt"),
    (dict(num_sequences=2, num_substeps=0), "num_substeps"),
    (dict(num_sequences=2, collision_radius=-1.0), "collision_radius"),
    (dict(num_sequences=2, collision_radius=10.0), "collision_radius"),
    (dict(num_sequences=2, switch_prob=1.5), "switch_prob"),
    (dict(num_sequences=2, obs_noise=-0.1), "obs_noise"),
    (dict(num_sequences=2, refractory_steps=-1), "refractory_steps"),
    (dict(num_sequences=2, spiral_damping=float("nan")), "spiral_damping"),
])
def test_bad_arguments_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ps.datasets.simulate_interacting_particles(jax.random.key(0), **kwargs)
