"""Cox proportional-hazards loss: the negative partial log-likelihood, with exact tie handling.

For log-hazards (risks) ``eta``, times ``t`` and event indicators ``d``, with distinct event times
``t_j``, the set ``D_j`` of the ``d_j`` subjects with an event at ``t_j`` and the risk set
``R_j = {i : t_i >= t_j}``:

* Breslow (1974)::

    log L = sum_j [ sum_{i in D_j} eta_i - d_j log sum_{i in R_j} exp(eta_i) ]

* Efron (1977), J. Am. Stat. Assoc. 72:557-565::

    log L = sum_j [ sum_{i in D_j} eta_i
                    - sum_{l=0}^{d_j-1} log( sum_{R_j} exp(eta) - (l / d_j) sum_{D_j} exp(eta) ) ]

Both equal Cox's (1972) partial likelihood when no event times are tied. Everything is vectorised
(one sort, one ``logcumsumexp``, scatter reductions per tied group) and computed in log space, so
risks of +-1e3 stay finite.

Under DDP the risk set must be global: :func:`gather_for_cox` all-gathers risks (with gradients),
times and events from every rank, so every rank computes the same loss on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

TIES = ("efron", "breslow")
REDUCTIONS = ("mean", "sum")


def cox_ph_loss(risk: Tensor, time: Tensor, event: Tensor, ties: str = "efron",
                reduction: str = "mean") -> Tensor:
    """Negative Cox partial log-likelihood.

    Args:
        risk: (B,) or (B, 1) log-hazards (higher = shorter survival), float.
        time: (B,) event or censoring times, any unit (e.g. days), finite and >= 0.
        event: (B,) 1 = event observed at ``time``, 0 = censored (bool, int or float).
        ties: ``"efron"`` or ``"breslow"`` handling of tied event times.
        reduction: ``"sum"`` (the negative log-likelihood) or ``"mean"`` (divided by the number of events).

    Returns:
        A scalar tensor in ``risk``'s dtype. A batch without events gives 0, still attached to the
        graph (zero gradients), never NaN.
    """
    risk, time, event = _check_inputs(risk, time, event, ties, reduction)
    n_events = event.sum()
    if risk.numel() == 0 or n_events.item() == 0:
        return risk.sum() * 0.0

    # Sort by time, descending: the risk set of sample k is then the prefix up to the last sample
    # with the same time.
    order = torch.argsort(time, descending=True, stable=True)
    eta, t, d = risk[order], time[order], event[order]
    _, group, counts = torch.unique_consecutive(t, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0) - 1  # (G,) index of the last sample of each tied group
    log_risk_set = torch.logcumsumexp(eta, 0)[last][group]  # (B,) log sum_{R_j} exp(eta)

    term = eta - log_risk_set
    if ties == "efron":
        term = term - _efron_correction(eta, d, group, counts.numel(), log_risk_set)
    loss = -(term * d.to(term.dtype)).sum()  # only events contribute; d keeps the graph intact
    if reduction == "mean":
        loss = loss / n_events.to(loss.dtype)
    return loss


def _efron_correction(eta: Tensor, d: Tensor, group: Tensor, n_groups: int, log_risk_set: Tensor) -> Tensor:
    """(B,) ``log(1 - (l / d_j) sum_{D_j} exp(eta) / sum_{R_j} exp(eta))`` for the l-th event of group j.

    Inputs sorted by time; ``d`` is 0/1, ``group`` the tied-time group of each sample. Values at
    censored samples are finite but unused.
    """
    dtype, device = eta.dtype, eta.device
    df = d.to(dtype)
    # log sum_{D_j} exp(eta): a shifted log-sum-exp over the events of each group
    masked = torch.where(d > 0, eta, torch.full_like(eta, -torch.inf))
    shift = torch.full((n_groups,), -torch.inf, dtype=dtype, device=device).scatter_reduce(
        0, group, masked.detach(), reduce="amax", include_self=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))  # groups without events
    summed = torch.zeros(n_groups, dtype=dtype, device=device).scatter_add(0, group, torch.exp(masked - shift[group]))
    n_tied = torch.zeros(n_groups, dtype=dtype, device=device).scatter_add(0, group, df)  # d_j
    # l: how many events of the same group precede this one (0 .. d_j - 1)
    before = torch.cumsum(df, 0) - df
    group_start = torch.zeros(n_groups, dtype=dtype, device=device).scatter_reduce(
        0, group, before, reduce="amin", include_self=False)
    rank = before - group_start[group]
    # censored samples get 0: their rank can reach d_j, and log1p(-1) = -inf would turn 0 * term into NaN
    frac = torch.where(d > 0, rank / n_tied[group].clamp_min(1.0), torch.zeros_like(rank))
    log_events = torch.log(summed.clamp_min(torch.finfo(dtype).tiny))[group] + shift[group]
    # events / risk set <= 1 (the clamp absorbs rounding, and the placeholder of groups without events),
    # so 1 - frac * ratio >= 1 - frac >= 1 / d_j: log1p is safe
    ratio = torch.exp((log_events - log_risk_set).clamp_max(0.0))
    return torch.log1p(-frac * ratio)


def _check_inputs(risk: Tensor, time: Tensor, event: Tensor, ties: str, reduction: str,
                  ) -> tuple[Tensor, Tensor, Tensor]:
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not all(isinstance(x, Tensor) for x in (risk, time, event)):
        raise ValueError("risk, time and event must be torch tensors")
    if risk.ndim == 2 and risk.shape[1] == 1:
        risk = risk[:, 0]
    if risk.ndim != 1 or time.ndim != 1 or event.ndim != 1:
        raise ValueError(f"expected risk (B,) or (B, 1), time (B,), event (B,); got shapes "
                         f"{tuple(risk.shape)}, {tuple(time.shape)}, {tuple(event.shape)}")
    if not (risk.shape[0] == time.shape[0] == event.shape[0]):
        raise ValueError(f"batch sizes differ: risk {risk.shape[0]}, time {time.shape[0]}, event {event.shape[0]}")
    if not risk.is_floating_point():
        raise ValueError(f"risk must be a floating-point tensor, got {risk.dtype}")
    if not bool(torch.isfinite(risk).all()):
        raise ValueError("risk contains NaN or inf")
    time = time.to(risk.dtype)
    if not bool(torch.isfinite(time).all()):
        raise ValueError("time contains NaN or inf")
    if bool((time < 0).any()):
        raise ValueError(f"time must be >= 0, got min {time.min().item()}")
    if event.dtype == torch.bool:
        event = event.long()
    if not bool(((event == 0) | (event == 1)).all()):
        raise ValueError("event must contain only 0 (censored) and 1 (event)")
    return risk, time, event.long()


def gather_for_cox(risk: Tensor, time: Tensor, event: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """All-gather (risk, time, event) from every rank, so the Cox risk set is the global batch.

    Identity unless ``torch.distributed`` is initialised with world size > 1. Ranks may hold
    different batch sizes (sizes are gathered, tensors padded to the largest, padding dropped).
    ``risk`` keeps its gradient (``torch.distributed.nn.functional.all_gather``); the result is the
    concatenation in rank order, identical on every rank.

    Gradients: every rank computes the same loss ``L`` on the global batch, and the all-gather's
    backward *sums* the gradients that the W ranks send to each rank's slice, so a rank's local
    ``risk.grad`` is ``W * dL/drisk``. DDP then *averages* parameter gradients over the W ranks,
    which divides by W again: the parameters receive exactly the single-process gradient of ``L`` on
    the concatenated batch, with no extra scaling. (Without DDP's averaging, divide by W yourself.)

    Shapes: risk (B_r,) or (B_r, 1), time (B_r,), event (B_r,) on rank r -> (sum_r B_r, ...).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return risk, time, event
    from torch.distributed.nn.functional import all_gather as all_gather_with_grad

    world = dist.get_world_size()
    time = time.to(risk.dtype)
    event = event.long()  # bool tensors are not supported by every backend's all_gather
    size = torch.tensor([risk.shape[0]], device=risk.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)

    def pad(x: Tensor) -> Tensor:
        if x.shape[0] == longest:
            return x.contiguous()
        filler = x.new_zeros((longest - x.shape[0], *x.shape[1:]))
        return torch.cat([x, filler], 0)

    risks = all_gather_with_grad(pad(risk))
    times, events = [], []
    for x, out in ((time, times), (event, events)):
        out.extend(torch.empty_like(pad(x)) for _ in range(world))
        dist.all_gather(out, pad(x))
    cut = lambda parts: torch.cat([p[:n] for p, n in zip(parts, sizes)], 0)  # noqa: E731
    return cut(risks), cut(times), cut(events)


class CoxPHLoss(nn.Module):
    """Module form of :func:`cox_ph_loss`; with ``sync_dist`` the risk set spans all DDP ranks.

    ``forward(risk (B,) or (B, 1), time (B,), event (B,)) -> scalar``. With ``sync_dist=True`` and an
    initialised process group, inputs are gathered with :func:`gather_for_cox` first (the loss is
    then the same on every rank, and ``mean`` divides by the global number of events).
    """

    def __init__(self, ties: str = "efron", reduction: str = "mean", sync_dist: bool = True) -> None:
        super().__init__()
        if ties not in TIES:
            raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.ties, self.reduction, self.sync_dist = ties, reduction, sync_dist

    def forward(self, risk: Tensor, time: Tensor, event: Tensor) -> Tensor:
        if self.sync_dist:
            risk, time, event = gather_for_cox(risk, time, event)
        return cox_ph_loss(risk, time, event, ties=self.ties, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"ties={self.ties!r}, reduction={self.reduction!r}, sync_dist={self.sync_dist}"
