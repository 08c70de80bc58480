"""C-MAPSS loader (`ps.datasets.load_cmapss`) for FD001-FD004: shapes and unit counts against
the data README and NASA's readme.txt, operating-regime identification against the six
nominal flight conditions of Saxena et al. (2008), per-regime normalisation against statistics
recomputed here from the raw training rows, the capped RUL target, backwards compatibility of
the FD001 call and input validation. FD002-FD004 are read from ../shared/data/cmapss."""
import functools
import gzip
import math
import os
import re

import numpy as np
import pytest

import probssm as ps

DATA_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cmapss"))
HAVE_SHARED = os.path.isfile(os.path.join(DATA_DIR, "train_FD002.txt.gz"))
needs_shared = pytest.mark.skipif(not HAVE_SHARED, reason=f"C-MAPSS FD002-FD004 not found in {DATA_DIR}")
PACKAGED = os.path.join(os.path.dirname(ps.datasets.cmapss.__file__), "data")

# Measured once with numpy.loadtxt, matching ../shared/data/cmapss/README.md:
# (rows, units, shortest, longest) for train and test, test RUL (min, max), regimes.
EXPECTED = {
    "FD001": ((20631, 100, 128, 362), (13096, 100, 31, 303), (7, 145), 1),
    "FD002": ((53759, 260, 128, 378), (33991, 259, 21, 367), (6, 194), 6),
    "FD003": ((24720, 100, 145, 525), (16596, 100, 38, 475), (6, 145), 1),
    "FD004": ((61249, 249, 128, 543), (41214, 248, 19, 486), (6, 195), 6),
}
# The six operating conditions (altitude kft, Mach, throttle resolver angle) of the simulator,
# Saxena et al. (2008); FD001/FD003 use only the first (sea level).
NOMINAL = np.array([[0, 0, 100], [10, 0.25, 100], [20, 0.70, 100], [25, 0.62, 60], [35, 0.84, 100], [42, 0.84, 100]])
SUBSETS = [pytest.param(s, marks=() if s == "FD001" else needs_shared) for s in EXPECTED]


@functools.lru_cache(maxsize=None)
def load(subset, normalize=False, cap=None):
    # FD001 from the copy inside the package (gzipped), the others from the shared directory.
    return ps.datasets.load_cmapss(subset, None if subset == "FD001" else DATA_DIR, normalize_conditions=normalize,
                                   rul_cap=cap)


def nominal_labels(settings):
    """Oracle regime of each row: the nominal condition within half a grid step, which must be unique."""
    close = ((np.abs(settings[:, None, 0] - NOMINAL[None, :, 0]) < 0.5)
             & (np.abs(settings[:, None, 1] - NOMINAL[None, :, 1]) < 0.005)
             & (settings[:, None, 2] == NOMINAL[None, :, 2]))
    assert np.all(close.sum(1) == 1)
    return np.argmax(close, axis=1)


@pytest.mark.parametrize("subset", SUBSETS)
def test_shapes_unit_counts_and_lengths(subset):
    (n_train, u_train, lo_train, hi_train), (n_test, u_test, lo_test, hi_test), (rul_lo, rul_hi), _ = EXPECTED[subset]
    data = load(subset)
    assert data.train.shape == (n_train, 26) and data.test.shape == (n_test, 26) and data.columns == ps.datasets.cmapss.COLUMNS
    assert data.test_rul.shape == (u_test,) and data.test_rul.dtype.kind == "i"
    assert (data.test_rul.min(), data.test_rul.max()) == (rul_lo, rul_hi)
    for rows, units, lo, hi in ((data.train, u_train, lo_train, hi_train), (data.test, u_test, lo_test, hi_test)):
        split = ps.datasets.split_units(rows)
        lengths = [len(u) for u in split]
        assert len(split) == units and (min(lengths), max(lengths)) == (lo, hi)
        assert all(np.array_equal(u[:, 1], np.arange(1, len(u) + 1)) for u in split)
    assert data.train_rul.shape == (n_train,) and data.train_regime.shape == (n_train,)
    assert data.test_regime.shape == (n_test,)


@needs_shared
def test_unit_counts_against_nasa_readme():
    with open(os.path.join(DATA_DIR, "readme.txt"), encoding="cp1252") as f:
        text = f.read()
    readme = {m[0]: (int(m[1]), int(m[2])) for m in
              re.findall(r"Data Set: (FD00\d)\s+Train trjectories: (\d+)\s+Test trajectories: (\d+)", text)}
    assert sorted(readme) == list(EXPECTED)
    files = {s: (len(np.unique(load(s).train[:, 0])), len(np.unique(load(s).test[:, 0]))) for s in EXPECTED}
    for s in ("FD001", "FD002", "FD003"):
        assert files[s] == readme[s]
    # NASA's readme swaps FD004 (248 train / 249 test); the files hold 249 training units that all
    # run to failure and 248 test units with one RUL each.
    assert readme["FD004"] == (248, 249) and files["FD004"] == (249, 248) == (249, len(load("FD004").test_rul))


@pytest.mark.parametrize("subset", SUBSETS)
def test_regimes_match_the_nominal_operating_conditions(subset):
    data = load(subset)
    num_regimes = EXPECTED[subset][3]
    assert data.regime_settings.shape == (num_regimes, 3)
    # Every training row gets a regime and every regime has rows.
    assert data.train_regime.min() == 0 and data.train_regime.max() == num_regimes - 1
    assert np.all(np.bincount(data.train_regime, minlength=num_regimes) > 0)
    for rows, labels in ((data.train, data.train_regime), (data.test, data.test_regime)):
        oracle = nominal_labels(rows[:, 2:5])
        # Regimes are numbered in the order of NOMINAL, so the labels must agree exactly.
        assert np.array_equal(labels, oracle)
    np.testing.assert_allclose(data.regime_settings, NOMINAL[:num_regimes], atol=0.01)
    # Nearest-centre assignment (used for test rows) reproduces the identified training regimes.
    again = ps.datasets.cmapss.operating_regimes(data.train[:, 2:5], data.regime_settings)
    assert np.array_equal(again.labels, data.train_regime)


@pytest.mark.parametrize("subset", SUBSETS)
def test_per_regime_normalisation_uses_training_statistics(subset):
    raw, norm = load(subset), load(subset, normalize=True, cap=125)
    assert norm.normalized and not raw.normalized
    np.testing.assert_array_equal(norm.train[:, :5], raw.train[:, :5])  # unit, cycle, settings untouched
    np.testing.assert_array_equal(norm.test[:, :5], raw.test[:, :5])
    np.testing.assert_array_equal(norm.train_regime, raw.train_regime)
    train_oracle, test_oracle = nominal_labels(raw.train[:, 2:5]), nominal_labels(raw.test[:, 2:5])
    max_mean, max_std, num_checked = 0.0, 0.0, 0
    for k in range(EXPECTED[subset][3]):
        x = raw.train[train_oracle == k, 5:]
        z = norm.train[train_oracle == k, 5:]
        varies = x.max(0) > x.min(0)
        max_mean = max(max_mean, np.abs(z[:, varies].mean(0)).max())
        max_std = max(max_std, np.abs(z[:, varies].std(0) - 1.0).max())
        num_checked += varies.sum()
        np.testing.assert_array_equal(z[:, ~varies], 0.0)  # constant within the regime: centred only
        # Test rows of the regime: z-scored with the training statistics recomputed here with
        # correctly rounded sums (math.fsum).
        mean = np.array([math.fsum(c) / len(c) for c in x.T])
        scale = np.array([math.sqrt(math.fsum((c - m) ** 2) / len(c)) if v else 1.0 for c, m, v in zip(x.T, mean, varies)])
        expected = (raw.test[test_oracle == k, 5:] - mean) / scale
        np.testing.assert_allclose(norm.test[test_oracle == k, 5:], expected, rtol=1e-10, atol=1e-9)
    assert max_mean < 1e-8 and max_std < 1e-8
    assert num_checked >= 14 * EXPECTED[subset][3]  # most of the 21 sensors vary within every regime


@pytest.mark.parametrize("subset", [pytest.param("FD004", marks=needs_shared)])
def test_normalisation_removes_the_operating_condition(subset):
    """In FD004 the regime explains almost all of a sensor's training variance; after per-regime
    normalisation it explains none (between-regime share of the variance is 0)."""
    raw, norm = load(subset), load(subset, normalize=True, cap=125)
    labels = raw.train_regime

    def between_share(col):
        means = np.array([col[labels == k].mean() for k in range(6)])
        return np.sum(np.bincount(labels) * (means - col.mean()) ** 2) / np.sum((col - col.mean()) ** 2)

    assert between_share(raw.train[:, 5 + 1]) > 0.99  # s2 (T24)
    assert between_share(norm.train[:, 5 + 1]) < 1e-20


@pytest.mark.parametrize("subset", [pytest.param("FD001"), pytest.param("FD004", marks=needs_shared)])
def test_rul_target_and_cap(subset):
    # The capped target comes with the normalised load (cached, shared with the tests above).
    raw, capped = load(subset), load(subset, normalize=True, cap=125)
    np.testing.assert_array_equal(capped.test_rul, raw.test_rul)  # the true test RUL is never capped
    start = 0
    for unit in ps.datasets.split_units(raw.train):
        n = len(unit)
        rul = np.arange(n - 1, -1, -1, dtype=float)  # run to failure: n - 1 cycles left at cycle 1, 0 at the last
        np.testing.assert_array_equal(raw.train_rul[start:start + n], rul)
        np.testing.assert_array_equal(capped.train_rul[start:start + n], np.minimum(rul, 125.0))
        start += n
    assert start == len(raw.train) and capped.train_rul.max() == 125.0 and raw.train_rul.max() > 125
    assert np.all(raw.train_rul[raw.train_rul <= 125] == capped.train_rul[raw.train_rul <= 125])
    if subset == "FD001":  # the cap alone leaves the rows raw; any positive cap works
        half = ps.datasets.load_cmapss("FD001", rul_cap=60.5)
        np.testing.assert_array_equal(half.train, raw.train)
        np.testing.assert_array_equal(half.train_rul, np.minimum(raw.train_rul, 60.5))


def test_fd001_default_call_is_unchanged():
    data = ps.datasets.load_cmapss()
    assert data is not None and isinstance(data, ps.datasets.CMAPSS)
    for name, expected in (("train", "train_FD001.txt.gz"), ("test", "test_FD001.txt.gz")):
        np.testing.assert_array_equal(getattr(data, name), np.loadtxt(os.path.join(PACKAGED, expected)))
    np.testing.assert_array_equal(data.test_rul, np.loadtxt(os.path.join(PACKAGED, "RUL_FD001.txt.gz")).astype(int))
    assert data.columns[:5] == ("unit", "cycle", "setting1", "setting2", "setting3") and data.columns[-1] == "s21"
    assert data._fields[:4] == ("train", "test", "test_rul", "columns") and not data.normalized
    old_style = ps.datasets.CMAPSS(data.train, data.test, data.test_rul, data.columns)  # four-field constructor
    assert old_style.train is data.train and old_style.train_rul is None
    if HAVE_SHARED:  # the plain-text copy (positional data_dir) reads the same as the packaged gzip
        plain = ps.datasets.load_cmapss("FD001", DATA_DIR)
        np.testing.assert_array_equal(plain.train, data.train)
        np.testing.assert_array_equal(plain.test, data.test)
        np.testing.assert_array_equal(plain.test_rul, data.test_rul)


def _write(directory, name, rows, fmt="%g"):
    with gzip.open(os.path.join(directory, name + ".gz"), "wt") as f:
        np.savetxt(f, rows, fmt=fmt)


def test_bad_input_raises_value_error_naming_the_argument(tmp_path):
    with pytest.raises(ValueError, match="subset"):
        ps.datasets.load_cmapss("FD009")
    with pytest.raises(ValueError, match=r"data_dir: only FD001 ships.*NASA.*train_FD002\.txt"):
        ps.datasets.load_cmapss("FD002")
    with pytest.raises(ValueError, match="data_dir.*not a directory"):
        ps.datasets.load_cmapss("FD003", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"data_dir: no train_FD004\.txt or train_FD004\.txt\.gz.*download") as err:
        ps.datasets.load_cmapss("FD004", str(tmp_path))
    assert isinstance(err.value, FileNotFoundError)  # what a missing file raised before
    for bad in (0, -5, float("nan"), True, "125"):
        with pytest.raises(ValueError, match="rul_cap"):
            ps.datasets.load_cmapss("FD001", rul_cap=bad)
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="normalize_conditions"):
            ps.datasets.load_cmapss("FD001", normalize_conditions=bad)

    # Malformed files: wrong column count, RUL count that does not match the test units.
    rows = load("FD001").train[:400]
    _write(tmp_path, "train_FD001.txt", rows[:, :25])
    _write(tmp_path, "test_FD001.txt", rows)
    _write(tmp_path, "RUL_FD001.txt", np.arange(3), fmt="%d")
    with pytest.raises(ValueError, match="data_dir.*25 columns"):
        ps.datasets.load_cmapss("FD001", str(tmp_path))
    _write(tmp_path, "train_FD001.txt", rows)
    with pytest.raises(ValueError, match="data_dir: RUL_FD001 has 3 values for 2 test units"):
        ps.datasets.load_cmapss("FD001", str(tmp_path))
    _write(tmp_path, "RUL_FD001.txt", np.array([10, 20]), fmt="%d")
    small = ps.datasets.load_cmapss("FD001", str(tmp_path), normalize_conditions=True)
    assert small.test_rul.tolist() == [10, 20] and small.train.shape == (400, 26)

    regimes = ps.datasets.cmapss.operating_regimes
    for bad in (np.zeros((5, 2)), np.zeros(3), np.zeros((0, 3)), np.full((2, 3), np.nan)):
        with pytest.raises(ValueError, match="settings"):
            regimes(bad)
    with pytest.raises(ValueError, match=r"centers: expected shape \(N, 3\)"):
        regimes(np.zeros((4, 3)), np.zeros(3))
    with pytest.raises(ValueError, match="rows"):
        ps.datasets.split_units(np.zeros(26))
