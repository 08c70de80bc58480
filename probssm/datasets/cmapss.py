"""NASA C-MAPSS turbofan engine degradation data (Saxena, Goebel, Simon & Eklund, PHM08).

FD001 ships inside the package (gzipped), so examples run on a fresh machine; FD002-FD004
load from a directory holding NASA's files (plain or ``.gz``).

Each row is one engine ("unit") at one operational cycle, 26 columns: unit, cycle,
three operational settings, 21 sensors. Training units run to failure; test units
are cut off before failure and ``test_rul`` gives the true remaining cycles after the
last test cycle of each unit.

FD002 and FD004 mix six operating conditions (altitude, Mach number, throttle resolver
angle), which move most sensors far more than wear does; `load_cmapss` can identify the
condition ("regime") of every row from the three settings and z-score each sensor within
its regime, with statistics from the training set only.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import numpy as np

__all__ = ["CMAPSS", "OperatingRegimes", "load_cmapss", "operating_regimes", "split_units", "COLUMNS"]

COLUMNS = ("unit", "cycle", "setting1", "setting2", "setting3") + tuple(f"s{i}" for i in range(1, 22))
_SUBSETS = ("FD001", "FD002", "FD003", "FD004")
_PACKAGED = os.path.join(os.path.dirname(__file__), "data")
_SETTINGS = slice(2, 5)
_SENSORS = slice(5, 26)
# Grid on which the settings are rounded to name a regime: altitude in kft to 1, Mach number
# to 0.01, throttle resolver angle to 1. The simulator's settings scatter by at most 0.009 kft
# and 0.002 Mach around the six nominal conditions (measured on all four subsets), far inside
# half a grid step, and the nominal conditions are at least one step apart.
_RESOLUTION = np.array([1.0, 0.01, 1.0])
_NASA = ("NASA's 'Turbofan Engine Degradation Simulation' data set (CMAPSSData.zip, from the NASA Ames "
         "Prognostics Center of Excellence data repository)")


class CMAPSS(NamedTuple):
    """One C-MAPSS subset. The first four fields are the files as read; the rest come from
    the training set (regimes, per-regime statistics, per-row RUL).

    Attributes:
        train: (N, 26) training rows: unit, cycle, 3 settings, 21 sensors. With
            ``normalize_conditions=True`` the 21 sensor columns are z-scored per regime;
            unit, cycle and settings are always raw.
        test: (M, 26) test rows, same columns and the same (training) normalisation.
        test_rul: (number of test units,) int, true RUL after each test unit's last cycle
            (never capped).
        columns: the 26 column names.
        train_rul: (N,) float, RUL of every training row, ``last cycle - cycle`` of its unit,
            capped at ``rul_cap`` when given (the piecewise-linear target).
        train_regime: (N,) int in [0, R), operating regime of every training row.
        test_regime: (M,) int in [0, R), regime of every test row (nearest training regime).
        regime_settings: (R, 3) mean raw settings of each regime on the training set, regimes
            sorted by (altitude, Mach, TRA), so regime 0 is sea level in every subset.
        sensor_mean: (R, 21) per-regime training mean of each raw sensor.
        sensor_scale: (R, 21) per-regime training standard deviation of each raw sensor; 1
            where the sensor is constant within the regime (it is then only centred).
        normalized: whether ``train``/``test`` sensors are normalised.
    """

    train: np.ndarray
    test: np.ndarray
    test_rul: np.ndarray
    columns: tuple
    # Defaults keep the original four-field constructor working.
    train_rul: Optional[np.ndarray] = None
    train_regime: Optional[np.ndarray] = None
    test_regime: Optional[np.ndarray] = None
    regime_settings: Optional[np.ndarray] = None
    sensor_mean: Optional[np.ndarray] = None
    sensor_scale: Optional[np.ndarray] = None
    normalized: bool = False


class OperatingRegimes(NamedTuple):
    """Result of `operating_regimes`: ``labels`` (N,) int in [0, R) and ``centers`` (R, 3)."""

    labels: np.ndarray
    centers: np.ndarray


class _MissingFile(ValueError, FileNotFoundError):
    """A ValueError (bad ``data_dir``) that is also the FileNotFoundError raised before."""


def _settings_array(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    if a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"{name}: expected shape (N, 3) (altitude, Mach, throttle resolver angle), got shape {a.shape}")
    if a.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one row, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: expected finite values, found NaN or inf")
    return a


def operating_regimes(settings, centers=None) -> OperatingRegimes:
    """Operating regime of each C-MAPSS row from its three settings.

    Without ``centers`` the regimes are identified: each row's settings are rounded to
    (1 kft, 0.01 Mach, 1 degree TRA) and every distinct rounded triple is one regime, numbered
    in lexicographic order of the triples; ``centers`` are the mean settings of each regime.
    This is deterministic and finds 1 regime in FD001/FD003 and 6 in FD002/FD004. With
    ``centers`` (from the training set) each row goes to the nearest centre, distances
    measured in grid steps, so test rows never create new regimes.

    Args:
        settings: (N, 3) operational settings (columns 3-5 of the files).
        centers: optional (R, 3) regime centres, e.g. ``operating_regimes(train[:, 2:5]).centers``.

    Returns:
        `OperatingRegimes` with ``labels`` (N,) int in [0, R) and ``centers`` (R, 3).

    Example:
        >>> data = ps.datasets.load_cmapss("FD002", "data/cmapss")
        >>> fit = ps.datasets.operating_regimes(data.train[:, 2:5])
        >>> test_labels = ps.datasets.operating_regimes(data.test[:, 2:5], fit.centers).labels
    """
    s = _settings_array(settings, "settings")
    if centers is None:
        # Integer grid indices: exact grouping, and -0.0 / 0.0 (settings scattered around zero) coincide.
        grid = np.round(s / _RESOLUTION).astype(np.int64)
        keys, labels = np.unique(grid, axis=0, return_inverse=True)
        labels = labels.reshape(-1)
        centers = np.stack([s[labels == k].mean(0) for k in range(len(keys))])
        return OperatingRegimes(labels.astype(np.int64), centers)
    c = _settings_array(centers, "centers")
    d = (((s[:, None, :] - c[None]) / _RESOLUTION) ** 2).sum(-1)
    return OperatingRegimes(np.argmin(d, axis=1).astype(np.int64), c)


def _find(directory, name, subset):
    for candidate in (name, name + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.exists(path):
            return path
    raise _MissingFile(
        f"data_dir: no {name} or {name}.gz in {directory!r}. {subset} needs train_{subset}.txt, test_{subset}.txt and "
        f"RUL_{subset}.txt (plain or gzipped) in data_dir: download {_NASA}, unzip it and pass the folder that holds "
        "those files as data_dir")


def _read(directory, name, subset):
    path = _find(directory, name, subset)
    rows = np.loadtxt(path, ndmin=2)
    if name.startswith("RUL"):
        return rows.reshape(-1)
    if rows.shape[1] != len(COLUMNS):
        raise ValueError(f"data_dir: {path} has {rows.shape[1]} columns, expected {len(COLUMNS)}")
    return rows


def _check_rul_cap(rul_cap):
    if rul_cap is None:
        return None
    if isinstance(rul_cap, (bool, np.bool_)) or not isinstance(rul_cap, (int, float, np.integer, np.floating)):
        raise ValueError(f"rul_cap: expected None or a positive number of cycles (e.g. 125), got {rul_cap!r}")
    if not (np.isfinite(rul_cap) and rul_cap > 0):
        raise ValueError(f"rul_cap: expected None or a positive number of cycles (e.g. 125), got {rul_cap}")
    return float(rul_cap)


def load_cmapss(subset: str = "FD001", data_dir: Optional[str] = None, *, normalize_conditions: bool = False,
                rul_cap: Optional[float] = None) -> CMAPSS:
    """Load one C-MAPSS subset, optionally normalised per operating regime.

    The four subsets (measured on NASA's files; lengths are cycles per unit; regimes as found
    by `operating_regimes`):

    | subset | faults | train units (rows, cycles min-max) | test units (rows, cycles min-max) | test RUL | regimes |
    |---|---|---|---|---|---|
    | FD001 | HPC | 100 (20631, 128-362) | 100 (13096, 31-303) | 7-145 | 1 |
    | FD002 | HPC | 260 (53759, 128-378) | 259 (33991, 21-367) | 6-194 | 6 |
    | FD003 | HPC, fan | 100 (24720, 145-525) | 100 (16596, 38-475) | 6-145 | 1 |
    | FD004 | HPC, fan | 249 (61249, 128-543) | 248 (41214, 19-486) | 6-195 | 6 |

    NASA's readme swaps FD004's counts (248 train, 249 test); the files hold 249 and 248.
    The six regimes of FD002/FD004 are (altitude kft, Mach, TRA) = (0, 0, 100), (10, 0.25, 100),
    (20, 0.70, 100), (25, 0.62, 60), (35, 0.84, 100), (42, 0.84, 100), numbered in that order.

    Normalisation (``normalize_conditions=True``): regimes are identified on the training
    settings, test rows go to the nearest training regime, and each sensor is z-scored with its
    training mean and standard deviation in the row's regime, for train and test alike (no test
    statistics are used). A sensor constant within a regime on the training set is only
    centred there (scale 1). With one regime (FD001, FD003) this is a plain training-set
    z-score. The regimes and statistics are returned in every case, so the raw data can be
    normalised later as ``(x - sensor_mean[regime]) / sensor_scale[regime]``.

    Args:
        subset: "FD001", "FD002", "FD003" or "FD004".
        data_dir: directory with ``train_<subset>.txt``, ``test_<subset>.txt`` and
            ``RUL_<subset>.txt`` (each may be gzipped). None: the FD001 copy shipped
            with probssm; FD002-FD004 need a directory holding NASA's files.
        normalize_conditions: z-score the 21 sensors per operating regime (see above).
            False (default): sensors as in the files.
        rul_cap: None (default) or a positive number: ``train_rul`` becomes
            ``min(last cycle - cycle, rul_cap)``, the usual piecewise-linear target (125).

    Returns:
        `CMAPSS` with float arrays ``train`` (N, 26), ``test`` (M, 26), integer ``test_rul``,
        ``columns``, and ``train_rul``, ``train_regime``, ``test_regime``, ``regime_settings``,
        ``sensor_mean``, ``sensor_scale``, ``normalized``.

    Raises:
        ValueError: unknown ``subset``; ``data_dir`` missing, not a directory, or without the
            subset's files (also a FileNotFoundError); malformed files (named by ``data_dir``);
            bad ``normalize_conditions`` or ``rul_cap``.

    Example:
        >>> data = ps.datasets.load_cmapss("FD001")
        >>> units = ps.datasets.split_units(data.train)   # list of (n_i, 26) arrays
        >>> fd4 = ps.datasets.load_cmapss("FD004", "data/cmapss", normalize_conditions=True, rul_cap=125)
    """
    if subset not in _SUBSETS:
        raise ValueError(f"subset: expected one of {_SUBSETS}, got {subset!r}")
    if not isinstance(normalize_conditions, (bool, np.bool_)):
        raise ValueError(f"normalize_conditions: expected True or False, got {normalize_conditions!r}")
    cap = _check_rul_cap(rul_cap)
    if data_dir is None:
        if subset != "FD001":
            raise ValueError(
                f"data_dir: only FD001 ships with probssm; for {subset} download {_NASA}, unzip it and pass "
                f"data_dir=<the folder holding train_{subset}.txt, test_{subset}.txt, RUL_{subset}.txt (plain or .gz)>")
        data_dir = _PACKAGED
    if not isinstance(data_dir, (str, os.PathLike)) or not os.path.isdir(data_dir):
        raise ValueError(f"data_dir: {data_dir!r} is not a directory")
    train = _read(data_dir, f"train_{subset}.txt", subset)
    test = _read(data_dir, f"test_{subset}.txt", subset)
    rul = _read(data_dir, f"RUL_{subset}.txt", subset).astype(int)
    num_test_units = len(np.unique(test[:, 0]))
    if rul.shape != (num_test_units,):
        raise ValueError(f"data_dir: RUL_{subset} has {rul.size} values for {num_test_units} test units")

    # Per-row RUL of the run-to-failure units: cycles left until the unit's last cycle.
    _, unit_index = np.unique(train[:, 0], return_inverse=True)
    unit_index = unit_index.reshape(-1)
    last = np.full(unit_index.max() + 1, -np.inf)
    np.maximum.at(last, unit_index, train[:, 1])
    train_rul = last[unit_index] - train[:, 1]
    if cap is not None:
        train_rul = np.minimum(train_rul, cap)

    regimes = operating_regimes(train[:, _SETTINGS])
    test_regime = operating_regimes(test[:, _SETTINGS], regimes.centers).labels
    num_regimes = len(regimes.centers)
    mean = np.zeros((num_regimes, 21))
    scale = np.ones((num_regimes, 21))
    for k in range(num_regimes):
        x = train[regimes.labels == k, _SENSORS]
        # Exactly constant sensors (the file's values are identical) keep scale 1; taking their
        # floating-point std (~1e-13) as the scale would blow rounding error up to O(1).
        constant = np.ptp(x, axis=0) == 0
        # Two-pass mean: a column mean summed row by row is off by ~N eps |mean|, which for
        # sensors like Nf (~2388, std 0.07) is 1e-8 standard deviations; the correction removes it.
        m = x.mean(0)
        m = m + (x - m).mean(0)
        mean[k] = np.where(constant, x[0], m)
        scale[k] = np.where(constant, 1.0, np.sqrt(((x - m) ** 2).mean(0)))

    if normalize_conditions:
        train = train.copy()
        test = test.copy()
        train[:, _SENSORS] = (train[:, _SENSORS] - mean[regimes.labels]) / scale[regimes.labels]
        test[:, _SENSORS] = (test[:, _SENSORS] - mean[test_regime]) / scale[test_regime]
    return CMAPSS(train, test, rul, COLUMNS, train_rul, regimes.labels, test_regime, regimes.centers, mean, scale,
                  bool(normalize_conditions))


def split_units(rows: np.ndarray) -> list:
    """Split a (N, 26) C-MAPSS array into one (n_i, 26) array per unit, in unit order."""
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] < 1:
        raise ValueError(f"rows: expected shape (N, 26) with the unit number in column 0, got shape {rows.shape}")
    units = rows[:, 0].astype(int)
    order = np.unique(units)
    return [rows[units == u] for u in order]
