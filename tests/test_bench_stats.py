"""The benchmarks' own statistics (benchmarks/survival.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_mean_ci95_is_student_t_uncorrected_and_nadeau_bengio_corrected():
    from scipy import stats
    from survival import mean_ci95

    values = [0.1, 0.2, 0.3]
    # ratio 0: scipy's Student-t interval of the mean
    lo, hi = stats.t.interval(0.95, 2, loc=0.2, scale=stats.sem(values))
    assert mean_ci95(values) == pytest.approx([lo, hi], abs=1e-12)
    # corrected resampled t: variance (1/J + n_test/n_train) s^2 = (1/3 + 1/4) * 0.01
    half = stats.t.ppf(0.975, 2) * ((1 / 3 + 0.25) * 0.01) ** 0.5
    assert mean_ci95(values, 0.25) == pytest.approx([0.2 - half, 0.2 + half], abs=1e-12)
    assert half == pytest.approx(0.3286205, abs=1e-6)  # 4.302653 * sqrt(0.0058333)
    assert mean_ci95([0.5]) is None
