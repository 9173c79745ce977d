"""Survival metrics: thin, checked wrappers around lifelines and scikit-survival.

Conventions everywhere: ``risk`` is a log-hazard-like score, *higher = shorter survival*; ``time``
is the event or censoring time in any unit (days in this project), ``event`` is 1 for an observed
event and 0 for censoring. Arrays are 1-D of length N unless stated; numpy arrays, lists and CPU or
GPU torch tensors are all accepted.

* Harrell's C (Harrell et al. 1982, JAMA 247:2543): lifelines ``concordance_index``.
* Uno's IPCW C (Uno et al. 2011, Stat. Med. 30:1105), cumulative/dynamic AUC (Uno et al. 2007;
  Hung & Chiang 2010) and the integrated Brier score (Graf et al. 1999): scikit-survival.
* Breslow's (1972) baseline cumulative hazard: scikit-survival's ``BreslowEstimator``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

log = logging.getLogger(__name__)


def _numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} is not numeric: {error}") from None


def check_survival_arrays(time: Any, event: Any, require_event: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Validate survival data; returns ``(time float64 (N,), event bool (N,))``.

    The checks are :func:`fahr.stats.validation.check_survival_arrays` (one implementation for the
    metrics, the trainer and ``fahr evaluate``), plus: both inputs must be 1-D.
    """
    from fahr.stats.validation import check_survival_arrays as check

    t, e = _numpy(time, "time"), _numpy(event, "event")
    if t.ndim != 1 or e.ndim != 1:
        raise ValueError(f"time and event must be 1-D, got shapes {t.shape} and {e.shape}")
    t, e = check(t, e, require_event=require_event)
    return t, e.astype(bool)


def _check_risk(risk: Any, n: int, name: str = "risk", ndim: tuple[int, ...] = (1,)) -> np.ndarray:
    r = _numpy(risk, name)
    if r.ndim == 2 and r.shape[1] == 1 and 1 in ndim:
        r = r[:, 0]
    if r.ndim not in ndim or r.shape[0] != n:
        raise ValueError(f"{name} must have {n} rows and {ndim} dimension(s), got shape {r.shape}")
    if not np.isfinite(r).all():
        raise ValueError(f"{name} contains NaN or inf")
    return r


def _surv(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    from sksurv.util import Surv

    return Surv.from_arrays(event=event, time=time)


def _train_test(train_time: Any, train_event: Any, test_time: Any, test_event: Any, until: np.ndarray | None,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Checked (train Surv, test Surv, test time, test event) for the IPCW metrics.

    scikit-survival estimates the censoring distribution on the train set and refuses test times
    beyond the largest train time. Test follow-up past that point is administratively censored
    there: for evaluation times ``until`` below it (required) the metrics are unchanged, because
    such subjects only enter as "still event-free" and their own weights are never used.
    """
    tr_t, tr_e = check_survival_arrays(train_time, train_event, require_event=False)
    te_t, te_e = check_survival_arrays(test_time, test_event)
    last = tr_t.max()
    if until is not None and (until >= last).any():
        raise ValueError(f"evaluation times must be below the largest train time {last} "
                         f"(the censoring distribution is unknown beyond it), got max {until.max()}")
    beyond = te_t > last
    if beyond.any():
        log.debug("censoring %d test subject(s) at the largest train time %s", int(beyond.sum()), last)
        te_t, te_e = np.where(beyond, last, te_t), te_e & ~beyond
        if not te_e.any():
            raise ValueError("no test events before the largest train time")
    return _surv(tr_t, tr_e), _surv(te_t, te_e), te_t, te_e


def harrell_c(time: Any, event: Any, risk: Any) -> float:
    """Harrell's concordance index of ``risk`` (higher = shorter survival); ties in risk count 1/2.

    A pair is comparable when the shorter time is an observed event. 0.5 = random, 1 = perfect.
    """
    from lifelines.utils import concordance_index

    t, e = check_survival_arrays(time, event)
    r = _check_risk(risk, t.size)
    # lifelines scores are "higher = longer survival"
    try:
        return float(concordance_index(t, -r, e))
    except ZeroDivisionError:
        raise ValueError("no comparable pairs (no event is followed by a longer time)") from None


def uno_c(train_time: Any, train_event: Any, test_time: Any, test_event: Any, risk: Any,
          tau: float | None = None) -> float:
    """Uno's IPCW concordance on the test set, censoring distribution estimated on the train set.

    ``risk`` (N_test,); ``tau`` truncates at that time (same unit as ``time``) and must be below
    the largest train time (the censoring weights are unknown beyond it).
    """
    from sksurv.metrics import concordance_index_ipcw

    until = None if tau is None else np.array([tau], dtype=np.float64)
    train, test, tt, _ = _train_test(train_time, train_event, test_time, test_event, until)
    r = _check_risk(risk, tt.size)
    return float(concordance_index_ipcw(train, test, r, tau=tau)[0])


def time_dependent_auc(train_time: Any, train_event: Any, test_time: Any, test_event: Any, risk: Any,
                       horizons: Any) -> tuple[np.ndarray, float]:
    """Cumulative/dynamic AUC at each horizon (cases: event by t, controls: still at risk after t).

    ``risk`` (N_test,) or (N_test, T) for a time-dependent score; ``horizons`` (T,) in the time unit,
    inside the test follow-up range. Returns ``(auc (T,), mean_auc)`` where the mean is weighted by
    the Kaplan-Meier estimate as in scikit-survival. Horizons must be below the largest train time.
    """
    from sksurv.metrics import cumulative_dynamic_auc

    grid = np.atleast_1d(_numpy(horizons, "horizons"))
    train, test, tt, _ = _train_test(train_time, train_event, test_time, test_event, grid)
    r = _check_risk(risk, tt.size, ndim=(1, 2))
    auc, mean_auc = cumulative_dynamic_auc(train, test, r, grid)
    return np.asarray(auc, dtype=np.float64), float(mean_auc)


def integrated_brier(train_time: Any, train_event: Any, test_time: Any, test_event: Any, surv: Any,
                     times: Any) -> float:
    """IPCW integrated Brier score of predicted survival probabilities ``surv`` (N_test, T) at ``times`` (T,).

    ``times`` must be increasing and inside the test follow-up range; lower is better (0.25 = constant 0.5).
    """
    from sksurv.metrics import integrated_brier_score

    grid = np.atleast_1d(_numpy(times, "times"))
    train, test, tt, _ = _train_test(train_time, train_event, test_time, test_event, grid)
    s = _check_risk(surv, tt.size, name="surv", ndim=(2,))
    if s.shape[1] != grid.size:
        raise ValueError(f"surv has {s.shape[1]} columns but there are {grid.size} times")
    return float(integrated_brier_score(train, test, s, grid))


class BreslowBaseline:
    """Breslow's estimate of the baseline cumulative hazard for fixed log-hazards (risks).

    ``H(t | risk) = H0c(t) * exp(risk - risk_offset)`` and ``S(t | risk) = exp(-H(t | risk))``, where
    ``H0c`` is the baseline at ``risk == risk_offset`` (the mean training risk, as lifelines centres
    covariates; this keeps ``exp`` in range). ``H0c`` is a right-continuous step function: 0 before
    the first observed time, constant after the last one (an extrapolation).
    """

    def __init__(self, times: Any = (), cumulative_hazard: Any = (), risk_offset: float = 0.0) -> None:
        self.times = np.asarray(times, dtype=np.float64)
        self.cumulative_hazard = np.asarray(cumulative_hazard, dtype=np.float64)
        self.risk_offset = float(risk_offset)
        if self.times.shape != self.cumulative_hazard.shape or self.times.ndim != 1:
            raise ValueError("times and cumulative_hazard must be 1-D arrays of the same length")

    def fit(self, risk: Any, time: Any, event: Any) -> BreslowBaseline:
        """Fit on training risks (N,), times (N,) and events (N,); returns self."""
        from sksurv.linear_model.coxph import BreslowEstimator

        t, e = check_survival_arrays(time, event)
        r = _check_risk(risk, t.size)
        self.risk_offset = float(r.mean())
        est = BreslowEstimator().fit(r - self.risk_offset, e, t)
        self.times = np.asarray(est.cum_baseline_hazard_.x, dtype=np.float64)
        self.cumulative_hazard = np.asarray(est.cum_baseline_hazard_.y, dtype=np.float64)
        return self

    def baseline(self, times: Any) -> np.ndarray:
        """(T,) ``H0c`` at ``times`` (T,), the cumulative hazard of a subject with risk == risk_offset."""
        if self.times.size == 0:
            raise ValueError("BreslowBaseline is not fitted")
        grid = np.atleast_1d(_numpy(times, "times"))
        if not np.isfinite(grid).all() or (grid < 0).any():
            raise ValueError("times must be finite and >= 0")
        index = np.searchsorted(self.times, grid, side="right") - 1
        return np.where(index >= 0, self.cumulative_hazard[np.clip(index, 0, None)], 0.0)

    def cumulative_hazard_at(self, risk: Any, times: Any) -> np.ndarray:
        """(N, T) cumulative hazard ``H(t | risk)`` for risks (N,) at times (T,)."""
        r = _numpy(risk, "risk").reshape(-1)
        return self.baseline(times)[None, :] * np.exp(r - self.risk_offset)[:, None]

    def survival(self, risk: Any, times: Any) -> np.ndarray:
        """(N, T) survival probabilities ``S(t | risk) = exp(-H0c(t) exp(risk - risk_offset))``."""
        return np.exp(-self.cumulative_hazard_at(risk, times))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form (lists and floats), e.g. for a model card."""
        return {"kind": "breslow_baseline", "risk_offset": self.risk_offset,
                "times": self.times.tolist(), "cumulative_hazard": self.cumulative_hazard.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BreslowBaseline:
        if data.get("kind") != "breslow_baseline":
            raise ValueError(f"not a breslow_baseline dict: kind={data.get('kind')!r}")
        return cls(data["times"], data["cumulative_hazard"], data["risk_offset"])


class ConcordanceIndex(Metric):
    """Harrell's C accumulated over batches (torchmetrics), for Lightning logging.

    ``update(risk (B,) or (B, 1), time (B,), event (B,))``; states are concatenated across processes
    (``dist_reduce_fx="cat"``) and ``compute()`` runs :func:`harrell_c` on CPU. Returns NaN (with a
    warning) when the accumulated data has no event, rather than stopping training.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("risk", default=[], dist_reduce_fx="cat")
        self.add_state("time", default=[], dist_reduce_fx="cat")
        self.add_state("event", default=[], dist_reduce_fx="cat")

    def update(self, risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> None:
        risk = risk.detach().reshape(-1).float()
        if not (risk.shape[0] == time.shape[0] == event.shape[0]):
            raise ValueError(f"batch sizes differ: risk {risk.shape[0]}, time {time.shape[0]}, event {event.shape[0]}")
        self.risk.append(risk)
        self.time.append(time.detach().reshape(-1).double())
        self.event.append(event.detach().reshape(-1).long())

    def compute(self) -> torch.Tensor:
        if not self.risk:
            return torch.tensor(float("nan"))
        risk, time, event = (dim_zero_cat(x).cpu() for x in (self.risk, self.time, self.event))
        if not bool(event.any()):
            log.warning("ConcordanceIndex: no events among %d samples, returning NaN", event.numel())
            return torch.tensor(float("nan"))
        return torch.tensor(harrell_c(time, event, risk), dtype=torch.float32)
