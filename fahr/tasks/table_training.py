"""DeepSurv mode's trainer: a plain full-batch loop for a :class:`~fahr.models.table_model.TableRiskModel`.

A feature table fits in memory and a step is a few small matrix products, so Lightning's per-step
bookkeeping (hooks, logging, callbacks: ~3 ms a step) was about half of a fit
(docs/benchmarks.md, ``survival_speed``). This loop does the same
training as :class:`fahr.tasks.survival.SurvivalTask` did under :meth:`fahr.job.TrainingJob.fit`, in
one process on the CPU in float32, drawing the same random numbers:

- the global torch RNG is reseeded at every step with :func:`fahr.job.step_seed` (dropout masks);
- training batches come from the caller's loader, iterated once per epoch (its generator draws the
  row order, as Lightning's epochs drew it);
- AdamW with warmup + cosine (:func:`fahr.tasks.optim.adamw_warmup_cosine`), the schedule stepped
  after every optimiser step; optional gradient clipping by norm or value (``trainer.gradient_clip_*``);
- validation (eval mode, the whole validation part in one batch) after every ``val_every`` steps and
  after the last step: the partial likelihood in float64, compared in float32 as Lightning's logged
  value was. The first validation's weights are kept, then each strictly lower loss's (NaN counts as
  +inf); early stopping ends training ``patience`` validations after the last new low, or at once
  when the loss is not finite.

There is no recovery checkpoint: a fit takes seconds, so a stopped fit (``should_stop``) is simply
run again by the rerun, from its start, to the same result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from fahr.job import step_seed
from fahr.losses.cox import cox_ph_loss
from fahr.tasks.optim import adamw_warmup_cosine


@dataclass
class TableFit:
    """How a table fit ended.

    Attributes:
        best_state: the kept weights (the model's ``state_dict``, cloned); None if stopped by a signal.
        best_step: optimiser steps done when they were validated (1-based: validated after step N).
        best_val_loss: their validation partial likelihood (mean over events), as float32.
        steps: optimiser steps done; ``stopped_early``: early stopping ended training before max_steps.
        interrupted: ``should_stop`` ended it (nothing is kept).
    """
    best_state: dict[str, torch.Tensor] | None
    best_step: int
    best_val_loss: float
    steps: int
    stopped_early: bool
    interrupted: bool = False


def _risk(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)["risk"].float()


def fit_table(model: nn.Module, task: dict[str, Any], train_batches: Any,
              val_rows: dict[str, torch.Tensor], *, seed: int, gradient_clip_val: float | None = None,
              gradient_clip_algorithm: str = "norm", log_every: int = 10,
              log: Callable[[dict[str, float], int], None] = lambda metrics, step: None,
              should_stop: Callable[[], bool] = lambda: False) -> TableFit:
    """Train ``model`` in place; returns the kept weights (:class:`TableFit`).

    Args:
        model: standardised rows (B, F) -> ``{"risk": (B,)}``, on the CPU.
        task: the ``task`` config: ``ties``, ``base_lr`` (the peak LR itself), ``min_lr``,
            ``warmup_steps``, ``max_steps``, ``weight_decay``, ``val_every_n_steps``,
            ``early_stopping_patience`` (0: none).
        train_batches: a loader (re-iterable, with ``len``); an epoch = its first ``len`` batches of
            ``{"x": (B, F), "time": (B,) days, "event": (B,) 0/1}`` (one batch when full-batch).
        val_rows: the whole validation part, the same keys; it must hold an event.
        seed: the run's seed (per-step reseeding).
        log: receives ``{"train/loss", "lr"}`` every ``log_every`` steps and after the last,
            ``{"val/loss", "val/c_index"}`` at every validation, with the 0-based index of the step
            just done.
        should_stop: polled before every step; True ends the fit with ``interrupted``.
    """
    from fahr.metrics.survival import harrell_c

    ties, max_steps = task["ties"], int(task["max_steps"])
    every = max(1, min(int(task["val_every_n_steps"]), max_steps))
    patience = int(task.get("early_stopping_patience") or 0)
    params = [p for p in model.parameters() if p.requires_grad]
    schedule = adamw_warmup_cosine([{"params": params, "weight_decay": task["weight_decay"]}], float(task["base_lr"]),
                                   int(task["warmup_steps"]), max_steps, float(task["min_lr"]))
    optimizer, scheduler = schedule["optimizer"], schedule["lr_scheduler"]["scheduler"]
    val_x, val_t, val_e = val_rows["x"], val_rows["time"].double(), val_rows["event"].double()

    best_state, best_step, best_loss = None, 0, math.inf
    wait, step = 0, 0
    model.train()
    while step < max_steps:
        epoch = iter(train_batches)
        # exactly len() batches: asking past the last would make the sampler draw another permutation
        for batch in (next(epoch) for _ in range(len(train_batches))):
            if should_stop():
                return TableFit(None, best_step, best_loss, step, False, interrupted=True)
            torch.default_generator.manual_seed(step_seed(seed, 0, step))  # the CPU generator only: torch.manual_seed also queues a seed for every lazy device (~0.5 ms)
            optimizer.zero_grad(set_to_none=True)
            loss = cox_ph_loss(_risk(model, batch["x"]), batch["time"], batch["event"], ties=ties)
            loss.backward()
            if gradient_clip_val:
                if gradient_clip_algorithm == "value":
                    nn.utils.clip_grad_value_(params, gradient_clip_val)
                else:
                    nn.utils.clip_grad_norm_(params, gradient_clip_val)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            step += 1
            if step % log_every == 0 or step == max_steps:
                log({"train/loss": float(loss.detach()), "lr": lr}, step - 1)
            if step % every == 0 or step == max_steps:
                model.eval()
                with torch.inference_mode():
                    risk = _risk(model, val_x)
                model.train()
                value = cox_ph_loss(risk.double(), val_t, val_e, ties=ties).float()
                log({"val/loss": float(value), "val/c_index": float(harrell_c(val_t.numpy(), val_e.numpy(), risk.numpy()))},
                    step - 1)
                current = float(value) if torch.isfinite(value) else math.inf
                if best_state is None or current < best_loss:
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    best_step, best_loss, wait = step, current, 0
                else:
                    wait += 1
                if patience and (not torch.isfinite(value) or wait >= patience):
                    return TableFit(best_state, best_step, best_loss, step, step < max_steps)
            if step == max_steps:
                break
    return TableFit(best_state, best_step, best_loss, step, False)
