"""Five single-input single-output system-identification records (actuator, ballbeam, drive,
dryer, gas furnace), the standard suite of the GP state-space model papers (RGP, Mattos et al.
2016; PR-SSM, Doerr et al. 2018; Ialongo et al. 2019; free-form VI, Fan et al. 2023).

The files ship inside the package (about 120 kB, ``datasets/data/sysid``; provenance and
licence in the README there). `load_sysid` applies the protocol of the GPSSM papers' public
code:

- the first half of each record trains, the second half tests (split points: actuator 512,
  ballbeam 500, drive 250, dryer 500, gas furnace 148);
- inputs and outputs are standardised with the mean and standard deviation of the training
  half only (the test half reuses them);
- the models are compared with a latent dimension of 4 and 100 inducing points
  (``SysID.latent_dim``, ``SysID.num_inducing``), by free-simulation RMSE and test
  log-likelihood on the held-out half, both in the standardised units.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

__all__ = ["SysID", "load_sysid", "SYSID_NAMES"]

_FOLDER = os.path.join(os.path.dirname(__file__), "data", "sysid")
SYSID_NAMES = ("actuator", "ballbeam", "drive", "dryer", "gas_furnace")
# Training length of each record: its first half.
_SPLIT = {"actuator": 512, "ballbeam": 500, "drive": 250, "dryer": 500, "gas_furnace": 148}
_SOURCE = {
    "actuator": "hydraulic actuator of a robot arm: input valve opening, output oil pressure (Sjoberg et al. 1995)",
    "ballbeam": "ball and beam (DaISy 96-004): input beam angle, output ball position, sampled every 0.1 s",
    "drive": "coupled electric drives (DaISy / Wigren & Schoukens): PRBS input u1, output z1",
    "dryer": "laboratory hair dryer (DaISy 96-006): input heater voltage, output outlet air temperature",
    "gas_furnace": "Box & Jenkins series J: input gas feed rate, output CO2 concentration, every 9 s",
}


class SysID(NamedTuple):
    """One system-identification record, split and standardised.

    Attributes:
        name: the record's name (one of `SYSID_NAMES`).
        train_inputs: (T_train, 1) standardised inputs of the training half.
        train_outputs: (T_train, 1) standardised outputs of the training half.
        test_inputs: (T_test, 1) inputs of the test half, standardised with the training statistics.
        test_outputs: (T_test, 1) outputs of the test half, likewise.
        input_mean, input_std, output_mean, output_std: the training statistics (raw units), to
            map predictions back with ``y * output_std + output_mean``.
        latent_dim: 4, the latent dimension of the benchmark protocol.
        num_inducing: 100, the number of inducing points of the benchmark protocol.
        description: what the record measures and where it comes from.
    """

    name: str
    train_inputs: np.ndarray
    train_outputs: np.ndarray
    test_inputs: np.ndarray
    test_outputs: np.ndarray
    input_mean: float
    input_std: float
    output_mean: float
    output_std: float
    latent_dim: int
    num_inducing: int
    description: str


def _read(name: str, folder: str):
    """(inputs, outputs) of a record as float64 vectors."""
    path = os.path.join(folder, {"actuator": "actuator.mat", "drive": "drive.mat", "ballbeam": "ballbeam.dat",
                                 "dryer": "dryer.dat", "gas_furnace": "gas_furnace.csv"}[name])
    if name in ("actuator", "drive"):
        from scipy.io import loadmat  # scipy is a dependency; imported here to keep `import probssm` light

        mat = loadmat(path)
        u, y = (mat["u"], mat["p"]) if name == "actuator" else (mat["u1"], mat["z1"])
        return np.asarray(u, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    table = np.loadtxt(path, delimiter="," if name == "gas_furnace" else None, skiprows=1 if name == "gas_furnace" else 0)
    return table[:, 0].astype(np.float64), table[:, 1].astype(np.float64)


def load_sysid(name: str, *, folder: str | None = None) -> SysID:
    """Load one benchmark record, split into halves and standardised by the training half.

    Args:
        name: one of ``"actuator"``, ``"ballbeam"``, ``"drive"``, ``"dryer"``, ``"gas_furnace"``.
        folder: a directory holding the five files under their usual names; by default the
            copies shipped with the package.

    Returns:
        A `SysID` with (T, 1) input and output arrays for each half and the training statistics.

    Raises:
        ValueError: ``name`` is not one of the five records, or ``folder`` lacks its file.
    """
    if name not in _SPLIT:
        raise ValueError(f"name: expected one of {SYSID_NAMES}, got {name!r}")
    folder = _FOLDER if folder is None else folder
    try:
        u, y = _read(name, folder)
    except FileNotFoundError as err:
        raise ValueError(f"folder: no file for the {name!r} record in {folder!r} ({err})") from None
    split = _SPLIT[name]
    u_mean, u_std = float(u[:split].mean()), float(u[:split].std())
    y_mean, y_std = float(y[:split].mean()), float(y[:split].std())
    u_std = u_std if u_std > 0 else 1.0
    y_std = y_std if y_std > 0 else 1.0
    us, ys = ((u - u_mean) / u_std)[:, None], ((y - y_mean) / y_std)[:, None]
    return SysID(name, us[:split], ys[:split], us[split:], ys[split:], u_mean, u_std, y_mean, y_std,
                 latent_dim=4, num_inducing=100, description=_SOURCE[name])
