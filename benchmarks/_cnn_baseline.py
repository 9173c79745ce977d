"""Compute-matched CNN baseline for ``benchmarks/faceage.py``: a timm ResNet-18 trained from scratch.

The recipe (self-supervised pretraining + fine-tuning) has to beat what a plain supervised CNN reaches
on the same labelled shards in the same wall-clock time on the same cores, otherwise its pretraining
bought nothing. This module is that CNN:

- :func:`train_resnet18`: timm ``resnet18`` (``pretrained=False``, ``num_classes=1``) trained from
  scratch on a fahr split (``.../index.json#train``) for ``minutes`` of wall time, counted from the
  call (shard loading, validation and saving included, like the recipe's subprocess wall time);
- :func:`load_resnet18`: the saved model as ``uint8 (B, 3, S, S) -> ages (B,)`` (years, float64);
- :func:`evaluate_on_shards`: :func:`fahr.metrics.age.age_metrics` on a shard split;
- :func:`predict_raw_photos`: raw photos decoded, detected and aligned exactly as ``fahr predict`` does
  (its ``load_photo``, ``resolve_preprocessing``, ``make_aligner``, ``status_of``), then the model.

Training choices (documented here because the result file only records the numbers):

- inputs: the shards' uint8 crops (resized to ``image_size`` if they differ), random horizontal flip
  (p=0.5, per image), ``/255`` then ImageNet mean/std;
- target: the network predicts ``(age - 35) / 20`` (a unit-scale target, so the randomly initialised
  head starts near the mean age); the loss is L1 on that, i.e. L1 in years / 20 (same minimiser);
  predictions are ``35 + 20 * output`` years;
- AdamW (betas 0.9/0.999, weight decay 0.05 on conv/linear weights, none on norms and biases, as timm's
  optimizer factory does by default);
- schedule: the first :data:`TIMING_STEPS` steps ramp the LR linearly (towards ``lr`` over a
  provisional :data:`PROVISIONAL_WARMUP` steps, so half of ``lr`` by their end) while steps
  ``TIMING_SKIP..TIMING_STEPS`` are timed (the first ones include loader start-up). Then
  ``total_steps = steps done + (remaining budget - 10 validations) / step time``, the
  validation time estimated from one timed forward pass of a validation batch; the warmup continues
  linearly to ``lr`` at ``max(PROVISIONAL_WARMUP, 5% of total_steps)`` (~70 steps for 45 minutes),
  then cosine to 0 at ``total_steps``. Training stops at ``total_steps`` or
  when the next step plus the final validation would pass the deadline, whichever comes first;
- validation: single pass (no mirror averaging, to keep it cheap) MAE on the val split every ~10% of
  the planned steps and after the last step; the best-val weights are kept in memory and saved;
- one DataLoader worker decodes JPEGs; the model runs on ``threads`` torch threads.

Files in ``out_dir``: ``resnet18.safetensors`` (state dict, no pickle) and ``resnet18.json`` (arch,
image_size, mean/std, target scaling, steps, minutes, validation curve).

Alone: ``python benchmarks/_cnn_baseline.py --index data/faceage_bench/utkface112/index.json
--minutes 3 --threads 2 --out /tmp/cnn_baseline [--photos a.jpg b.jpg ...]`` trains, evaluates on
the test split and predicts the given raw photos (aligned as the index's shards were).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ARCH = "resnet18"
WEIGHTS_FILE = f"{ARCH}.safetensors"
CONFIG_FILE = f"{ARCH}.json"
MEAN = (0.485, 0.456, 0.406)  # ImageNet (timm's IMAGENET_DEFAULT_MEAN / _STD)
STD = (0.229, 0.224, 0.225)
AGE_CENTER, AGE_SCALE = 35.0, 20.0  # the network predicts (age - AGE_CENTER) / AGE_SCALE
WEIGHT_DECAY = 0.05
TIMING_SKIP, TIMING_STEPS = 5, 20  # steps [TIMING_SKIP, TIMING_STEPS) are timed
PROVISIONAL_WARMUP = 40  # the LR ramp's slope during the timing steps (lr / this per step); min warmup
WARMUP_FRACTION = 0.05
VAL_FRACTION = 0.1  # validate every this fraction of the planned steps
AGE_CLIP = (0.0, 120.0)
PREDICT_CHUNK = 64


# ---- model ------------------------------------------------------------------------------------------


def _create_model() -> torch.nn.Module:
    import timm

    return timm.create_model(ARCH, pretrained=False, num_classes=1)


def _normalise(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (B, 3, S', S') -> float (B, 3, S, S) normalised with ImageNet mean/std."""
    x = images.float().div_(255.0)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        from torchvision.transforms.v2 import functional as tvf

        x = tvf.resize(x, [image_size, image_size], antialias=True)
    mean = torch.tensor(MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def _random_hflip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image of a (B, 3, S, S) batch horizontally with probability 0.5."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def _param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


@torch.inference_mode()
def _val_mae(model: torch.nn.Module, images: torch.Tensor, ages: np.ndarray, image_size: int,
             batch_size: int) -> float:
    """Single-pass (no flip) MAE in years of ``model`` (put in eval mode here) on uint8 crops."""
    model.eval()
    preds = []
    for i in range(0, len(images), batch_size):
        out = model(_normalise(images[i : i + batch_size], image_size))[:, 0]
        preds.append(out.double().numpy() * AGE_SCALE + AGE_CENTER)
    pred = np.clip(np.concatenate(preds), *AGE_CLIP)
    return float(np.mean(np.abs(pred - ages)))


def _decode_all(faces) -> torch.Tensor:
    """Every crop of a LabelledFaces set as one uint8 (N, 3, S, S) tensor."""
    return torch.stack([faces[i]["image"] for i in range(len(faces))])


def _load_split(spec: str, image_size: int):
    from fahr.data.shard_index import resolve_shard_spec
    from fahr.data.labelled import load_labelled_faces

    return load_labelled_faces(resolve_shard_spec(spec), required=["age"], image_size=image_size)


def _lr_at(step: int, lr: float, warmup: int | None, total: int | None) -> float:
    """LR of 0-based ``step``: linear ramp (slope lr/PROVISIONAL_WARMUP) for the timing steps, then
    linear to ``lr`` at ``warmup``, then cosine to 0 at ``total`` (``warmup``/``total`` None while
    they are still unknown)."""
    ramp_end = lr * min(TIMING_STEPS, PROVISIONAL_WARMUP) / PROVISIONAL_WARMUP
    if warmup is None or total is None or step < TIMING_STEPS:
        return lr * min(step + 1, PROVISIONAL_WARMUP) / PROVISIONAL_WARMUP
    if step < warmup:
        return ramp_end + (lr - ramp_end) * (step + 1 - TIMING_STEPS) / (warmup - TIMING_STEPS)
    span = max(1, total - warmup)
    return 0.5 * lr * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


# ---- training ---------------------------------------------------------------------------------------


def train_resnet18(train_index: str, val_index: str, image_size: int, minutes: float, threads: int,
                   out_dir: Path, seed: int = 0, batch_size: int = 64, lr: float = 1e-3,
                   log=print) -> dict:
    """Train a ResNet-18 from scratch on ``train_index`` for ``minutes`` of wall time (from this call).

    Args:
        train_index, val_index: fahr shard specs, e.g. ``"data/.../index.json#train"``.
        image_size: side of the model's input crops (the shards' crops are resized if they differ).
        minutes: wall-clock budget, loading, validation and saving included.
        threads: torch threads for the model (the one loader worker decodes on its own thread).
        out_dir: where ``resnet18.safetensors`` and ``resnet18.json`` are written.

    Returns:
        ``{"steps", "seconds", "images_per_s", "val_curve", "best_val_mae", "weights"}`` plus
        ``best_step``, ``planned_steps``, ``warmup_steps``, ``step_seconds``, ``epochs``,
        ``train_images``, ``val_images``. ``val_curve`` is ``[(step, minutes since the call, val MAE)]``;
        ``images_per_s`` counts training steps only (forward, backward, update; not validation);
        ``seconds`` is the whole call.
    """
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader

    t_start = time.perf_counter()
    deadline = t_start + minutes * 60.0
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)

    train = _load_split(train_index, image_size)
    val = _load_split(val_index, image_size)
    val_images, val_ages = _decode_all(val), val.labels["age"]
    log(f"resnet18: {len(train)} train / {len(val)} val crops at {image_size} px loaded in "
        f"{time.perf_counter() - t_start:.0f} s; budget {minutes:.1f} min, {threads} threads")

    model = _create_model()
    optimizer = torch.optim.AdamW(_param_groups(model), lr=lr, betas=(0.9, 0.999))
    loader_gen = torch.Generator().manual_seed(seed)
    flip_gen = torch.Generator().manual_seed(seed + 1)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=1,
                        persistent_workers=True, generator=loader_gen)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train)} training crops is less than one batch of {batch_size}")

    def batches():
        while True:
            yield from loader  # the persistent worker ends with the loader, when this call returns

    # one timed forward pass of a validation batch -> the cost of a validation
    _val_mae(model, val_images[:batch_size], val_ages[:batch_size], image_size, batch_size)  # warm-up
    t0 = time.perf_counter()
    _val_mae(model, val_images[:batch_size], val_ages[:batch_size], image_size, batch_size)
    val_seconds = (time.perf_counter() - t0) * len(val_images) / min(batch_size, len(val_images))

    step, train_seconds = 0, 0.0
    warmup = total = None
    val_every = None
    step_seconds = None
    timing_t0 = None
    last_step_s = 0.0
    curve: list[tuple[int, float, float]] = []
    best_mae, best_step, best_state = math.inf, 0, None

    def validate() -> None:
        nonlocal best_mae, best_step, best_state
        mae = _val_mae(model, val_images, val_ages, image_size, batch_size)
        curve.append((step, (time.perf_counter() - t_start) / 60.0, mae))
        if mae < best_mae:
            best_mae, best_step = mae, step
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        log(f"resnet18: step {step}/{total or '?'} {curve[-1][1]:.1f} min val MAE {mae:.2f} "
            f"(best {best_mae:.2f} at step {best_step})")

    stream = batches()
    for images, ages in ((b["image"], b["age"]) for b in stream):
        now = time.perf_counter()
        per_step = step_seconds if step_seconds is not None else last_step_s
        if step > 0 and (now + per_step + val_seconds > deadline or (total is not None and step >= total)):
            break
        if step == TIMING_SKIP:
            timing_t0 = now
        if step == TIMING_STEPS and total is None:
            step_seconds = (now - timing_t0) / (TIMING_STEPS - TIMING_SKIP)
            remaining = deadline - now - val_seconds  # the final validation
            # ~1 / VAL_FRACTION validations over the whole run (not one per 1 / VAL_FRACTION steps: that
            # planned 847 steps, 18 minutes, for a 35-minute budget in the 2026-12-04 run)
            validations = round(1 / VAL_FRACTION)
            total = step + max(0, int((remaining - validations * val_seconds) / step_seconds))
            warmup = min(max(PROVISIONAL_WARMUP, round(WARMUP_FRACTION * total)), total)
            val_every = max(1, round(VAL_FRACTION * total))
            log(f"resnet18: {step_seconds:.2f} s/step ({batch_size / step_seconds:.0f} images/s), validation "
                f"~{val_seconds:.0f} s -> {total} steps ({total * batch_size / len(train):.1f} epochs), "
                f"warmup {warmup}, validation every {val_every}")
            if step >= total:
                break
        model.train()
        t_step = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, lr, warmup, total)
        x = _normalise(_random_hflip(images, flip_gen), image_size)
        target = (ages.float() - AGE_CENTER) / AGE_SCALE
        loss = torch.nn.functional.l1_loss(model(x)[:, 0], target)
        if not torch.isfinite(loss):
            raise RuntimeError(f"resnet18: non-finite loss at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        last_step_s = time.perf_counter() - t_step
        train_seconds += last_step_s
        if val_every is not None and step % val_every == 0 and step != total:
            validate()
    if not curve or curve[-1][0] != step:
        validate()
    stream.close()

    model.load_state_dict(best_state)
    weights = out_dir / WEIGHTS_FILE
    save_file({k: v.contiguous() for k, v in best_state.items()}, str(weights))
    seconds = time.perf_counter() - t_start
    info = {
        "steps": step,
        "seconds": seconds,
        "images_per_s": step * batch_size / train_seconds if train_seconds > 0 else float("nan"),
        "val_curve": curve,
        "best_val_mae": best_mae,
        "weights": str(weights),
        "best_step": best_step,
        "planned_steps": total,
        "warmup_steps": warmup,
        "step_seconds": step_seconds,
        "epochs": step / steps_per_epoch,
        "train_images": len(train),
        "val_images": len(val),
    }
    config = {"arch": ARCH, "timm_pretrained": False, "num_classes": 1, "image_size": image_size,
              "mean": list(MEAN), "std": list(STD), "age_center": AGE_CENTER, "age_scale": AGE_SCALE,
              "flip_average": True, "train_index": train_index, "val_index": val_index, "seed": seed,
              "batch_size": batch_size, "lr": lr, "weight_decay": WEIGHT_DECAY, "threads": threads,
              "budget_minutes": minutes, "minutes": seconds / 60.0,
              **{k: info[k] for k in ("steps", "best_step", "best_val_mae", "planned_steps", "warmup_steps",
                                      "images_per_s", "epochs", "val_curve")}}
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    log(f"resnet18: {step} steps ({info['epochs']:.1f} epochs) in {seconds / 60:.1f} min, "
        f"{info['images_per_s']:.0f} images/s; best val MAE {best_mae:.2f} at step {best_step} -> {weights}")
    return info


# ---- inference --------------------------------------------------------------------------------------


def load_resnet18(out_dir: Path) -> Callable[[torch.Tensor], np.ndarray]:
    """The model saved by :func:`train_resnet18` as a function ``uint8 (B, 3, S, S) -> (B,)`` ages in
    years (float64 numpy, clipped to [0, 120]): eval mode, no grad, the mean of the predictions for
    each image and its mirror image. Crops of another side are resized to the trained ``image_size``;
    each image's result does not depend on the others in the batch (no batch statistics)."""
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    config = json.loads((out_dir / CONFIG_FILE).read_text())
    if config.get("arch") != ARCH:
        raise ValueError(f"{out_dir / CONFIG_FILE}: arch {config.get('arch')!r}, expected {ARCH!r}")
    model = _create_model()
    model.load_state_dict(load_file(str(out_dir / WEIGHTS_FILE)))
    model.eval()
    size = int(config["image_size"])
    center, scale = float(config["age_center"]), float(config["age_scale"])

    @torch.inference_mode()
    def predict(images: torch.Tensor) -> np.ndarray:
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 (B, 3, S, S) crops, got {images.dtype} {tuple(images.shape)}")
        out = []
        for i in range(0, len(images), PREDICT_CHUNK):
            x = _normalise(images[i : i + PREDICT_CHUNK], size)
            y = (model(x)[:, 0] + model(x.flip(-1))[:, 0]) / 2
            out.append(y.double().numpy() * scale + center)
        pred = np.concatenate(out) if out else np.zeros(0)
        return np.clip(pred, *AGE_CLIP)

    return predict


def evaluate_on_shards(predict_fn: Callable[[torch.Tensor], np.ndarray], spec: str, image_size: int) -> dict:
    """:func:`fahr.metrics.age.age_metrics` of ``predict_fn`` on a shard split (``.../index.json#test``),
    crops read at ``image_size``; plus ``n`` (int)."""
    from fahr.metrics.age import age_metrics

    faces = _load_split(spec, image_size)
    preds = []
    for i in range(0, len(faces), 256):
        batch = torch.stack([faces[j]["image"] for j in range(i, min(i + 256, len(faces)))])
        preds.append(predict_fn(batch))
    true = faces.labels["age"]
    return {**age_metrics(np.concatenate(preds), true), "n": len(true)}


def predict_raw_photos(predict_fn: Callable[[torch.Tensor], np.ndarray], paths: list[str],
                       card_preprocessing: dict) -> list[dict]:
    """FaceAge of raw photos, decoded, detected and aligned exactly as ``fahr predict`` does for a
    model whose card has ``preprocessing = card_preprocessing`` (checked by its
    ``resolve_preprocessing``). Returns ``[{"path", "status", "faceage"}]`` in input order; ``status``
    is one of :data:`fahr.inference.photos.STATUSES` and ``faceage`` is None unless it is ``ok``."""
    from fahr.faces.rejection import RejectedError
    from fahr.inference.photos import load_photo, status_of
    from fahr.inference.predict import make_aligner, resolve_preprocessing

    prep = resolve_preprocessing({"preprocessing": dict(card_preprocessing)})
    aligner = make_aligner(prep)
    rows: list[dict] = []
    for start in range(0, len(paths), PREDICT_CHUNK):
        chunk = paths[start : start + PREDICT_CHUNK]
        crops: list[np.ndarray] = []
        chunk_rows: list[dict] = []
        for path in chunk:
            row = {"path": path, "status": "ok", "faceage": None}
            try:
                image = load_photo(path)
            except RejectedError as e:
                row["status"] = status_of(e.reason)
            else:
                (res,) = aligner.align([image])
                if isinstance(res, RejectedError):
                    row["status"] = status_of(res.reason)
                else:
                    crops.append(res.crop)
            chunk_rows.append(row)
        if crops:
            batch = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
            ages = iter(predict_fn(batch))
            for row in chunk_rows:
                if row["status"] == "ok":
                    row["faceage"] = float(next(ages))
        rows.extend(chunk_rows)
    return rows


# ---- alone ------------------------------------------------------------------------------------------


def _index_preprocessing(index: Path) -> dict[str, Any]:
    """The preprocessing the index's shards were made with, as a card would record it."""
    options = json.loads(Path(index).read_text()).get("options", {})
    align = options.get("align", {})
    return {"detect": not options.get("skip_detection", False),
            **{k: align[k] for k in ("image_size", "margin", "multi_face", "min_confidence") if k in align}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="ResNet-18 from scratch on fahr age shards (FaceAge baseline)")
    parser.add_argument("--index", required=True, help="a `fahr shards` output's index.json (train/val/test)")
    parser.add_argument("--size", type=int, default=112, help="model input side in pixels")
    parser.add_argument("--minutes", type=float, default=3.0, help="wall-clock budget for training")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="/tmp/cnn_baseline", help="output folder (weights + JSON)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--photos", nargs="*", default=[],
                        help="raw photos to predict, aligned as the index's shards were")
    args = parser.parse_args(argv)

    index, out = Path(args.index), Path(args.out)
    info = train_resnet18(f"{index}#train", f"{index}#val", image_size=args.size, minutes=args.minutes,
                          threads=args.threads, out_dir=out, seed=args.seed, batch_size=args.batch_size,
                          lr=args.lr)
    predict_fn = load_resnet18(out)
    t0 = time.perf_counter()
    test = evaluate_on_shards(predict_fn, f"{index}#test", args.size)
    print(f"test: n {test['n']}, MAE {test['mae']:.2f}, CS5 {test['cs5']:.3f}, r {test['pearson_r']:.3f}, "
          f"mean error {test['mean_error']:+.2f} ({time.perf_counter() - t0:.0f} s)")
    summary = {k: v for k, v in info.items() if k != "val_curve"} | {"test": test}
    if args.photos:
        t0 = time.perf_counter()
        rows = predict_raw_photos(predict_fn, args.photos, _index_preprocessing(index))
        for r in rows:
            age = "" if r["faceage"] is None else f"{r['faceage']:6.1f}"
            print(f"  {r['status']:<14} {age:>6}  {r['path']}")
        summary["photos"] = {"n": len(rows), "ok": sum(r["status"] == "ok" for r in rows),
                             "seconds": time.perf_counter() - t0}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "test"} | {"test_mae": test["mae"]}, indent=2))


if __name__ == "__main__":
    main()
