"""`ps.datasets.load_sysid`: the shipped files, the half split and the training-half
standardisation of the GPSSM benchmark protocol."""
import numpy as np
import pytest
from scipy.io import loadmat

import probssm as ps
from probssm.datasets import sysid

LENGTHS = {"actuator": 1024, "ballbeam": 1000, "drive": 500, "dryer": 1000, "gas_furnace": 296}


@pytest.mark.parametrize("name", sysid.SYSID_NAMES)
def test_halves_are_standardised_by_the_training_half(name):
    d = ps.datasets.load_sysid(name)
    half = LENGTHS[name] // 2
    assert d.train_inputs.shape == d.train_outputs.shape == (half, 1)
    assert d.test_inputs.shape == d.test_outputs.shape == (LENGTHS[name] - half, 1)
    np.testing.assert_allclose([d.train_inputs.mean(), d.train_outputs.mean()], 0.0, atol=1e-12)
    np.testing.assert_allclose([d.train_inputs.std(), d.train_outputs.std()], 1.0, rtol=1e-12)
    assert (d.latent_dim, d.num_inducing) == (4, 100)
    # the test half is mapped with the training statistics, not its own
    u, y = sysid._read(name, sysid._FOLDER)
    np.testing.assert_allclose(d.test_outputs[:, 0], (y[half:] - y[:half].mean()) / y[:half].std(), rtol=1e-12)
    np.testing.assert_allclose(d.test_inputs[:, 0], (u[half:] - u[:half].mean()) / u[:half].std(), rtol=1e-12)


def test_values_are_the_files_columns():
    d = ps.datasets.load_sysid("actuator")
    mat = loadmat(f"{sysid._FOLDER}/actuator.mat")
    np.testing.assert_allclose(d.test_outputs[:, 0] * d.output_std + d.output_mean, mat["p"][512:, 0], rtol=1e-12)
    g = ps.datasets.load_sysid("gas_furnace")
    table = np.loadtxt(f"{sysid._FOLDER}/gas_furnace.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(g.train_inputs[:, 0] * g.input_std + g.input_mean, table[:148, 0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g.train_outputs[0, 0] * g.output_std + g.output_mean, 53.8)


def test_bad_names_and_folders_raise_value_errors(tmp_path):
    with pytest.raises(ValueError, match="name"):
        ps.datasets.load_sysid("furnace")
    with pytest.raises(ValueError, match="folder"):
        ps.datasets.load_sysid("dryer", folder=str(tmp_path))
