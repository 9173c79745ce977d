"""Cox partial-likelihood loss against lifelines, scikit-survival and pycox; zero events; DDP; bad inputs."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch

from fahr.losses import CoxPHLoss, cox_ph_loss, gather_for_cox

TOL = 1e-5


def rossi():
    from lifelines.datasets import load_rossi

    df = load_rossi()
    covariates = [c for c in df.columns if c not in ("week", "arrest")]
    return df[covariates].to_numpy(float), df["week"].to_numpy(float), df["arrest"].to_numpy(int)


def random_data(seed: int, n: int = 300, ties: bool = False):
    """(X (n, 3), time (n,), event (n,)): Cox-exponential times, exponential censoring."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    t_event = rng.exponential(1.0 / np.exp(x @ np.array([0.8, -0.5, 0.2])))
    t_cens = rng.exponential(1.5, size=n)
    time = np.minimum(t_event, t_cens)
    if ties:  # heavy ties: ~25 distinct times
        time = np.ceil(time * 10.0)
    return x, time, (t_event <= t_cens).astype(int)


def fit_torch(x, time, event, ties):
    """Coefficients (p,) minimising the sum-reduced loss of a linear model, and the log-likelihood."""
    x, t, e = torch.tensor(x), torch.tensor(time), torch.tensor(event)
    beta = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([beta], lr=1, max_iter=200, tolerance_grad=1e-10, tolerance_change=0.0,
                            history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = cox_ph_loss(x @ beta, t, e, ties=ties, reduction="sum")
        loss.backward()
        return loss

    opt.step(closure)
    # LBFGS's line search stalls near the optimum on unscaled covariates (rossi's age, prio): polish
    # with Newton steps on the exact Hessian (p <= 7)
    f = lambda b: cox_ph_loss(x @ b, t, e, ties=ties, reduction="sum")  # noqa: E731
    grad = lambda b: torch.autograd.functional.jacobian(f, b)  # noqa: E731
    b = beta.detach()
    for _ in range(3):
        b = b - torch.linalg.solve(torch.autograd.functional.hessian(f, b), grad(b))
    assert grad(b).abs().max() < 1e-9, "did not converge"
    beta = b
    with torch.no_grad():
        loglik = -cox_ph_loss(x @ beta, t, e, ties=ties, reduction="sum").item()
    return beta.detach().numpy(), loglik


def lifelines_fit(x, time, event):
    import pandas as pd
    from lifelines import CoxPHFitter

    df = pd.DataFrame(x, columns=[f"x{i}" for i in range(x.shape[1])]).assign(T=time, E=event)
    # lifelines stops at a relative log-likelihood change of 1e-9 by default, ~2e-5 from the optimum
    # in coefficients here: ask it to converge fully
    cph = CoxPHFitter(penalizer=0.0).fit(df, "T", "E", fit_options=dict(precision=1e-12, r_precision=0.0))
    return cph.params_.to_numpy(), cph.log_likelihood_


def sksurv_fit(x, time, event, ties):
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    model = CoxPHSurvivalAnalysis(alpha=0.0, ties=ties, n_iter=200, tol=1e-12)
    return model.fit(x, Surv.from_arrays(event.astype(bool), time)).coef_


DATASETS = [("rossi", None)] + [(f"random-ties{t}", s) for t in (False, True) for s in range(3)]


def get_data(name, seed):
    if name == "rossi":
        return rossi()
    return random_data(seed, ties=name.endswith("True"))


@pytest.mark.parametrize("name,seed", DATASETS)
def test_efron_matches_lifelines(name, seed):
    x, time, event = get_data(name, seed)
    beta, loglik = fit_torch(x, time, event, "efron")
    ref_beta, ref_loglik = lifelines_fit(x, time, event)
    np.testing.assert_allclose(beta, ref_beta, atol=TOL, rtol=0)
    assert loglik == pytest.approx(ref_loglik, abs=TOL)


@pytest.mark.parametrize("ties", ["breslow", "efron"])
@pytest.mark.parametrize("name,seed", DATASETS)
def test_matches_sksurv(name, seed, ties):
    x, time, event = get_data(name, seed)
    beta, _ = fit_torch(x, time, event, ties)
    np.testing.assert_allclose(beta, sksurv_fit(x, time, event, ties), atol=TOL, rtol=0)


def test_breslow_and_efron_differ_only_with_ties():
    for ties_in_data in (False, True):
        x, time, event = random_data(0, ties=ties_in_data)
        risk, t, e = torch.tensor(x[:, 0]), torch.tensor(time), torch.tensor(event)
        gap = abs(cox_ph_loss(risk, t, e, "efron").item() - cox_ph_loss(risk, t, e, "breslow").item())
        assert (gap > 1e-3) if ties_in_data else (gap < 1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_matches_pycox_without_ties(seed):
    from pycox.models.loss import cox_ph_loss as pycox_loss

    gen = torch.Generator().manual_seed(seed)
    n = 64
    risk = torch.randn(n, dtype=torch.float64, generator=gen, requires_grad=True)
    time = torch.rand(n, dtype=torch.float64, generator=gen) * 1000.0  # continuous: no ties
    event = (torch.rand(n, generator=gen) < 0.6).long()
    for ties in ("efron", "breslow"):
        ours = cox_ph_loss(risk, time, event, ties=ties)
        (g_ours,) = torch.autograd.grad(ours, risk)
        # pycox adds eps inside the log of the risk-set sum; eps=0 gives the exact likelihood
        ref = pycox_loss(risk, time, event.double(), eps=0.0)
        (g_ref,) = torch.autograd.grad(ref, risk)
        assert ours.item() == pytest.approx(ref.item(), abs=1e-12)
        torch.testing.assert_close(g_ours, g_ref, atol=1e-12, rtol=0)
        # with its default eps=1e-7 the two differ by a relative amount of order eps
        assert ours.item() == pytest.approx(pycox_loss(risk, time, event.double()).item(), rel=1e-5)


def test_zero_events_gives_connected_zero():
    risk = torch.randn(8, requires_grad=True)
    loss = cox_ph_loss(risk, torch.rand(8), torch.zeros(8, dtype=torch.long))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(risk.grad, torch.zeros(8))
    empty = torch.zeros(0, requires_grad=True)
    assert cox_ph_loss(empty, torch.zeros(0), torch.zeros(0)).item() == 0.0


def test_reductions_and_shapes():
    x, time, event = random_data(1, ties=True)
    risk, t, e = torch.tensor(x[:, 1]), torch.tensor(time), torch.tensor(event)
    total = cox_ph_loss(risk, t, e, reduction="sum")
    assert cox_ph_loss(risk, t, e).item() == pytest.approx(total.item() / event.sum())
    assert cox_ph_loss(risk[:, None], t, e.bool()).item() == pytest.approx(total.item() / event.sum())
    # the loss does not depend on the input order
    perm = torch.randperm(len(t), generator=torch.Generator().manual_seed(0))
    assert cox_ph_loss(risk[perm], t[perm], e[perm], reduction="sum").item() == pytest.approx(total.item())


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_numerically_stable_for_large_risks(ties):
    x, time, event = random_data(2, ties=True)
    small = torch.tensor(x[:, 0], dtype=torch.float32)
    t, e = torch.tensor(time, dtype=torch.float32), torch.tensor(event)
    reference = cox_ph_loss(small, t, e, ties=ties)
    for offset in (1e3, -1e3):  # the partial likelihood is shift-invariant
        assert cox_ph_loss(small + offset, t, e, ties=ties).item() == pytest.approx(reference.item(), abs=1e-3)
    wide = (small * 400.0).clamp(-1e3, 1e3).requires_grad_()
    loss = cox_ph_loss(wide, t, e, ties=ties)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(wide.grad).all()


@pytest.mark.parametrize("bad,match", [
    (dict(risk=torch.zeros(3)), "batch sizes differ"),
    (dict(risk=torch.zeros(4, 2)), "expected risk"),
    (dict(time=torch.tensor([1.0, float("nan"), 2.0, 3.0])), "NaN or inf"),
    (dict(time=torch.tensor([1.0, float("inf"), 2.0, 3.0])), "NaN or inf"),
    (dict(time=torch.tensor([1.0, -1.0, 2.0, 3.0])), ">= 0"),
    (dict(event=torch.tensor([0, 2, 1, 0])), "only 0"),
    (dict(risk=torch.tensor([0.0, float("nan"), 0.0, 0.0])), "risk contains"),
    (dict(ties="exact"), "ties"),
    (dict(reduction="none"), "reduction"),
])
def test_bad_inputs(bad, match):
    args = dict(risk=torch.zeros(4), time=torch.ones(4), event=torch.tensor([1, 0, 1, 0]))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        cox_ph_loss(**args)


def test_gather_is_identity_without_process_group():
    risk, time, event = torch.randn(5), torch.rand(5), torch.ones(5)
    out = gather_for_cox(risk, time, event)
    assert out[0] is risk and out[1] is time and out[2] is event


# --------------------------------------------------------------------------- DDP on CPU (gloo)

SIZES = [(7, 12), (5, 0)]  # unequal per-rank batches; in the second case rank 1 has an empty batch


def ddp_data(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, dtype=torch.float64, generator=gen)
    time = torch.randint(1, 6, (n,), generator=gen).double()  # ties across ranks
    event = (torch.rand(n, generator=gen) < 0.5).long()
    event[0] = 1
    return x, time, event


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1).double()


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = []
        for case, sizes in enumerate(SIZES):
            x, time, event = ddp_data(sum(sizes), seed=case)
            lo = sum(sizes[:rank])
            part = slice(lo, lo + sizes[rank])
            model = DistributedDataParallel(make_model())
            for ties in ("efron", "breslow"):
                model.zero_grad()
                loss = CoxPHLoss(ties=ties)(model(x[part]), time[part], event[part])
                loss.backward()
                results.append((loss.detach(), [p.grad.clone() for p in model.module.parameters()]))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Without it the rank that ends first tears gloo down while the other still talks to it:
        # "terminate called without an active exception" (SIGABRT), seen in CI.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_matches_single_process_on_concatenated_batch(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    init_file = tempfile.mktemp(dir=tmp_path, prefix="pg_")
    mp.spawn(_ddp_worker, args=(world, init_file, str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    expected = []
    for case, sizes in enumerate(SIZES):
        x, time, event = ddp_data(sum(sizes), seed=case)
        model = make_model()
        for ties in ("efron", "breslow"):
            model.zero_grad()
            loss = CoxPHLoss(ties=ties, sync_dist=False)(model(x), time, event)
            loss.backward()
            expected.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))

    for results in ranks:
        for (loss, grads), (ref_loss, ref_grads) in zip(results, expected, strict=True):
            torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=0)
            for g, ref in zip(grads, ref_grads, strict=True):
                torch.testing.assert_close(g, ref, atol=1e-12, rtol=0)
