"""NASA C-MAPSS turbofan engine degradation data (Saxena, Goebel, Simon & Eklund, PHM08).

FD001 ships inside the package (gzipped), so examples run on a fresh machine; FD002-FD004
load from a directory holding NASA's files (plain or ``.gz``).

Each row is one engine ("unit") at one operational cycle, 26 columns: unit, cycle,
three operational settings, 21 sensors. Training units run to failure; test units
are cut off before failure and ``test_rul`` gives the true remaining cycles after the
last test cycle of each unit.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import numpy as np

__all__ = ["CMAPSS", "load_cmapss", "split_units", "COLUMNS"]

COLUMNS = ("unit", "cycle", "setting1", "setting2", "setting3") + tuple(f"s{i}" for i in range(1, 22))
_SUBSETS = ("FD001", "FD002", "FD003", "FD004")
_PACKAGED = os.path.join(os.path.dirname(__file__), "data")


class CMAPSS(NamedTuple):
    train: np.ndarray  # (N, 26): unit, cycle, 3 settings, 21 sensors
    test: np.ndarray  # (M, 26)
    test_rul: np.ndarray  # (number of test units,) true RUL after each test unit's last cycle
    columns: tuple  # the 26 column names


def _find(directory, name):
    for candidate in (name, name + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"data_dir: no {name} or {name}.gz in {directory}")


def load_cmapss(subset: str = "FD001", data_dir: Optional[str] = None) -> CMAPSS:
    """Load one C-MAPSS subset.

    Args:
        subset: "FD001", "FD002", "FD003" or "FD004".
        data_dir: directory with ``train_<subset>.txt``, ``test_<subset>.txt`` and
            ``RUL_<subset>.txt`` (each may be gzipped). None: the FD001 copy shipped
            with probssm (other subsets need a directory).

    Returns:
        `CMAPSS` with float arrays ``train`` (N, 26), ``test`` (M, 26) and integer ``test_rul``.

    Example:
        >>> data = ps.datasets.load_cmapss("FD001")
        >>> units = ps.datasets.split_units(data.train)   # list of (n_i, 26) arrays
    """
    if subset not in _SUBSETS:
        raise ValueError(f"subset: expected one of {_SUBSETS}, got {subset!r}")
    if data_dir is None:
        if subset != "FD001":
            raise ValueError(f"data_dir: only FD001 ships with probssm; pass the directory holding {subset}")
        data_dir = _PACKAGED
    if not os.path.isdir(data_dir):
        raise ValueError(f"data_dir: {data_dir!r} is not a directory")
    train = np.loadtxt(_find(data_dir, f"train_{subset}.txt"))
    test = np.loadtxt(_find(data_dir, f"test_{subset}.txt"))
    rul = np.loadtxt(_find(data_dir, f"RUL_{subset}.txt")).astype(int).reshape(-1)
    return CMAPSS(train, test, rul, COLUMNS)


def split_units(rows: np.ndarray) -> list:
    """Split a (N, 26) C-MAPSS array into one (n_i, 26) array per unit, in unit order."""
    rows = np.asarray(rows)
    units = rows[:, 0].astype(int)
    order = np.unique(units)
    return [rows[units == u] for u in order]
