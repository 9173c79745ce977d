"""Training augmentation (alignment jitter + photometric) (fahr.data.augment): exact values, per-sample independence, the
task.augment config keys, and where the fine-tune tasks apply it (training only)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError
from torch import nn

from conftest import compose_config
from fahr.boundary import InputError
from fahr.config.finetune_schema import AugmentConfig, FinetuneAgeConfig, FinetuneSurvivalConfig
from fahr.config.schema import validate
from fahr.data.augment import (
    AFFINE,
    ANGLE,
    BRIGHTNESS,
    DEFAULTS,
    N_DRAWS,
    QUALITY,
    SCALE,
    SHIFT_X,
    SHIFT_Y,
    SIGMA,
    apply_draws,
    augment_settings,
    augment_batch,
    sample_draws,
)

S = 32
EVERYTHING = {"greyscale_p": 0.5, "lighting_p": 0.5, "blur_p": 0.5, "jpeg_p": 0.5, "noise_p": 0.5, "affine_p": 0.5}
ALWAYS = {k: 1.0 for k in EVERYTHING}
LIGHTING_OFF = {"brightness": 0.0, "contrast": 0.0, "gamma": 0.0, "colour_temperature": 0.0}


def faces(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth colour images with texture (JPEG and blur must have something to change)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 4, 4, generator=g)
    smooth = torch.nn.functional.interpolate(base, size=(S, S), mode="bilinear", align_corners=False)
    texture = torch.rand(n, 3, S, S, generator=g) * 0.2
    return ((smooth * 0.8 + texture) * 255).round().clamp(0, 255).to(torch.uint8)


def gen(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def as_uint8(x: torch.Tensor) -> torch.Tensor:
    """The module's single rounding of a float [0, 1] image."""
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------- off means untouched


@pytest.mark.parametrize("cfg", [None, {}, dict(DEFAULTS), dataclasses.asdict(AugmentConfig())])
def test_all_off_returns_the_input_tensor_and_draws_nothing(cfg):
    images = faces(4)
    g = gen()
    state, global_state = g.get_state(), torch.get_rng_state()
    out = augment_batch(images, cfg, generator=g)
    assert out is images
    assert torch.equal(g.get_state(), state) and torch.equal(torch.get_rng_state(), global_state)
    out = augment_batch(images, cfg)  # global RNG: untouched as well
    assert out is images and torch.equal(torch.get_rng_state(), global_state)


def test_schema_defaults_are_the_modules_defaults_and_off():
    assert dataclasses.asdict(AugmentConfig()) == DEFAULTS
    assert all(DEFAULTS[k] == 0.0 for k in EVERYTHING)


# ---------------------------------------------------------------- exact values


def test_greyscale_is_torchvisions_luma_on_three_equal_channels():
    images = faces(5)
    out = augment_batch(images, {"greyscale_p": 1.0}, generator=gen())
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    assert torch.equal(out, as_uint8(TF.rgb_to_grayscale(images.float() / 255, num_output_channels=3)))
    # torchvision's uint8 kernel truncates where this rounds: never more than one level apart
    assert (out.int() - TF.rgb_to_grayscale(images, num_output_channels=3).int()).abs().max() <= 1


def test_brightness_factor_is_drawn_per_sample_and_applied_exactly():
    cfg = {"lighting_p": 1.0, **LIGHTING_OFF, "brightness": 0.3}
    images = faces(6)
    u = sample_draws(6, gen(3))[:, BRIGHTNESS]
    factors = (1 + 0.3 * (2 * u - 1)).tolist()
    assert all(0.7 <= f <= 1.3 for f in factors) and len(set(factors)) == 6  # one factor per sample
    out = augment_batch(images, cfg, generator=gen(3))
    for i, f in enumerate(factors):
        assert torch.equal(out[i], as_uint8(TF.adjust_brightness(images[i].float() / 255, f)))
    # on a flat grey image the factor is visible directly
    grey = torch.full((6, 3, S, S), 100, dtype=torch.uint8)
    out = augment_batch(grey, cfg, generator=gen(3))
    assert out[:, :, 0, 0].tolist() == [[round(100 * f)] * 3 for f in factors]


def test_full_lighting_matches_torchvision_ops_in_order():
    cfg = {"lighting_p": 1.0, "brightness": 0.2, "contrast": 0.3, "gamma": 0.4, "colour_temperature": 0.1}
    images = faces(3)
    draws = sample_draws(3, gen(11))
    out = apply_draws(images, draws, cfg)
    for i, u in enumerate(draws.tolist()):
        b, c = 1 + 0.2 * (2 * u[2] - 1), 1 + 0.3 * (2 * u[3] - 1)
        gamma, t = math.exp(0.4 * (2 * u[4] - 1)), 0.1 * (2 * u[5] - 1)
        x = TF.adjust_gamma(TF.adjust_contrast(TF.adjust_brightness(images[i].float() / 255, b), c), gamma)
        x = (x * torch.tensor([1 + t, 1.0, 1 - t])[:, None, None]).clamp(0, 1)
        assert torch.equal(out[i], as_uint8(x))


def test_jpeg_changes_the_image_keeps_shape_and_dtype_and_uses_a_quality_in_range():
    images = faces(4)
    cfg = {"jpeg_p": 1.0, "jpeg_quality": [20, 40]}
    out = augment_batch(images, cfg, generator=gen(5))
    assert out.shape == images.shape and out.dtype == torch.uint8
    qualities = [min(20 + int(u * 21), 40) for u in sample_draws(4, gen(5))[:, QUALITY].tolist()]
    for i, q in enumerate(qualities):
        assert 20 <= q <= 40
        assert not torch.equal(out[i], images[i])
        assert torch.equal(out[i], TF.jpeg(images[i], q))


def test_blur_is_torchvisions_gaussian_and_smooths():
    images = faces(3)
    out = augment_batch(images, {"blur_p": 1.0, "blur_sigma": 2.0}, generator=gen(2))
    u = sample_draws(3, gen(2))[:, SIGMA].tolist()
    for i in range(3):
        sigma = 0.1 + 1.9 * u[i]
        k = 2 * math.ceil(3 * sigma) + 1  # +-3 sigma
        expected = TF.gaussian_blur(images[i].float() / 255, [k, k], [sigma, sigma])
        assert torch.equal(out[i], as_uint8(expected))
        assert out[i].float().diff(dim=-1).abs().mean() <= images[i].float().diff(dim=-1).abs().mean()


def test_noise_has_the_configured_std_and_stays_grey_on_a_grey_sample():
    flat = torch.full((4, 3, 64, 64), 128, dtype=torch.uint8)
    out = augment_batch(flat, {"noise_p": 1.0, "noise_std": 8.0}, generator=gen())
    std = (out.float() - 128).std(dim=(1, 2, 3))
    assert torch.all((std > 7.0) & (std < 9.0)), std
    grey = augment_batch(flat, {"noise_p": 1.0, "greyscale_p": 1.0, "noise_std": 8.0}, generator=gen())
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    assert grey.float().std() > 7.0


def test_same_generator_same_output_and_probability_is_per_sample():
    images = faces(64)
    a = augment_batch(images, EVERYTHING, generator=gen(1))
    assert torch.equal(a, augment_batch(images, EVERYTHING, generator=gen(1)))
    changed = (a != images).flatten(1).any(1).float().mean().item()
    assert 0.8 < changed < 1.0  # with p = 0.5 for each of five transforms, ~97% change
    grey = augment_batch(images, {"greyscale_p": 0.5}, generator=gen(1))
    is_grey = (grey[:, 0] == grey[:, 1]).flatten(1).all(1) & (grey[:, 1] == grey[:, 2]).flatten(1).all(1)
    assert 16 < int(is_grey.sum()) < 48


# ---------------------------------------------------------------- alignment jitter (affine)


def affine_draws(n: int, **cols: float) -> torch.Tensor:
    """Draws that apply only the affine (every other probability column at 0.99 with p < 1), its
    magnitude columns at 0.5 (= 0) unless given: column value 1.0 means +max, 0.0 means -max."""
    d = torch.full((n, N_DRAWS), 0.99, dtype=torch.float64)
    d[:, AFFINE] = 0.0
    d[:, [ANGLE, SCALE, SHIFT_X, SHIFT_Y]] = 0.5
    for name, value in cols.items():
        d[:, {"angle": ANGLE, "scale": SCALE, "shift_x": SHIFT_X, "shift_y": SHIFT_Y}[name]] = value
    return d


def test_affine_with_zero_magnitudes_is_the_identity():
    images = faces(3)
    assert torch.equal(apply_draws(images, affine_draws(3), {"affine_p": 1.0}), images)


@pytest.mark.parametrize("col,sign", [("shift_x", 1), ("shift_x", -1), ("shift_y", 1), ("shift_y", -1)])
def test_affine_shift_of_whole_pixels_moves_the_face_and_pads_black(col, sign):
    images = faces(2)
    out = apply_draws(images, affine_draws(2, **{col: 1.0 if sign > 0 else 0.0}), {"affine_p": 1.0, "shift": 3 / S})
    dim = -1 if col == "shift_x" else -2
    expected = torch.zeros_like(images)
    src = images.narrow(dim, 0, S - 3) if sign > 0 else images.narrow(dim, 3, S - 3)
    expected.narrow(dim, 3 if sign > 0 else 0, S - 3).copy_(src)
    assert torch.equal(out, expected)


def test_affine_rotation_of_90_degrees_is_a_quarter_turn_clockwise():
    images = faces(2)
    out = apply_draws(images, affine_draws(2, angle=1.0), {"affine_p": 1.0, "rotation": 90.0})
    assert torch.equal(out, torch.rot90(images, -1, (-2, -1)))


def test_affine_scale_zooms_about_the_centre():
    # a centred white square of side 8 in a 32 px black image, scaled by 1.5: side 12, still centred
    images = torch.zeros(1, 3, S, S, dtype=torch.uint8)
    images[..., 12:20, 12:20] = 255
    out = apply_draws(images, affine_draws(1, scale=1.0), {"affine_p": 1.0, "scale": 0.5})
    bright = out[0, 0] >= 128
    rows, cols = bright.any(1).nonzero().flatten(), bright.any(0).nonzero().flatten()
    assert (rows.tolist(), cols.tolist()) == (list(range(10, 22)), list(range(10, 22)))
    # symmetric about the centre lines, to one level of float rounding
    a = out.int()
    assert (a - a.flip(-1)).abs().max() <= 1 and (a - a.flip(-2)).abs().max() <= 1


@pytest.mark.parametrize("bad", [{"scale": 1.0}, {"shift": 0.6}, {"rotation": 181.0}, {"affine_p": 2.0}])
def test_affine_settings_out_of_range_are_refused(bad):
    with pytest.raises(InputError, match="task.augment." + next(iter(bad))):
        augment_settings(bad)


# ---------------------------------------------------------------- per-sample independence


def test_a_samples_draws_depend_only_on_its_position():
    big, small = sample_draws(9, gen(4)), sample_draws(3, gen(4))
    assert big.shape == (9, N_DRAWS) and torch.equal(big[:3], small)
    assert sample_draws(0, gen(4)).shape == (0, N_DRAWS)


@pytest.mark.parametrize("cfg", [EVERYTHING, ALWAYS], ids=["p=0.5", "p=1"])
def test_a_sample_alone_equals_the_same_sample_in_a_batch(cfg):
    images = faces(8)
    draws = sample_draws(8, gen(9))
    batch = apply_draws(images, draws, cfg)
    for i in range(8):
        assert torch.equal(apply_draws(images[i:i + 1], draws[i:i + 1], cfg)[0], batch[i])


def test_a_samples_output_does_not_depend_on_the_other_samples():
    images, others = faces(6, seed=0), faces(6, seed=1)
    mixed = torch.cat([images[:1], others[1:]])
    # deterministic op with p = 1: any generator
    grey = augment_batch(images, {"greyscale_p": 1.0}, generator=gen(1))
    assert torch.equal(augment_batch(mixed, {"greyscale_p": 1.0}, generator=gen(2))[0], grey[0])
    # everything on, same generator: sample 0's result is the same whatever its neighbours are
    assert torch.equal(augment_batch(mixed, ALWAYS, generator=gen(3))[0],
                       augment_batch(images, ALWAYS, generator=gen(3))[0])
    # and contrast uses the sample's own mean: a black neighbour does not move it
    cfg = {"lighting_p": 1.0, **LIGHTING_OFF, "contrast": 0.5}
    black = torch.cat([images[:1], torch.zeros_like(others[1:])])
    assert torch.equal(augment_batch(black, cfg, generator=gen(3))[0],
                       augment_batch(images, cfg, generator=gen(3))[0])


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="uint8"):
        augment_batch(faces(2).float(), ALWAYS)
    with pytest.raises(ValueError, match=r"\(B, 3, S, S\)"):
        augment_batch(faces(2)[:, :1], ALWAYS)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("name, schema", [("finetune_age", FinetuneAgeConfig),
                                          ("finetune_survival", FinetuneSurvivalConfig)])
def test_config_accepts_the_augment_keys(name, schema):
    overrides = ["data.root=x", "task.augment.greyscale_p=0.2", "task.augment.lighting_p=0.8",
                 "task.augment.brightness=0.3", "task.augment.contrast=0.3", "task.augment.gamma=0.3",
                 "task.augment.colour_temperature=0.1", "task.augment.blur_p=0.3", "task.augment.blur_sigma=1.5",
                 "task.augment.jpeg_p=0.5", "task.augment.jpeg_quality=[30,90]", "task.augment.noise_p=0.3",
                 "task.augment.noise_std=5"]
    cfg = compose_config(name, overrides)
    validate(cfg, schema)
    assert cfg.task.augment.jpeg_quality == [30, 90] and cfg.task.augment.greyscale_p == 0.2
    assert compose_config(name, ["data.root=x"]).task.augment == DEFAULTS  # off unless asked


@pytest.mark.parametrize("override, message", [
    ("task.augment.greyscale_p=1.5", r"task\.augment\.greyscale_p must be in \[0, 1\], got 1\.5"),
    ("task.augment.brightness=1.0", r"task\.augment\.brightness must be in \[0, 0\.9\], got 1\.0"),
    ("task.augment.blur_sigma=0", r"task\.augment\.blur_sigma must be in \[0\.1, 10\], got 0"),
    ("task.augment.jpeg_quality=[0,90]", r"task\.augment\.jpeg_quality must be in \[1, 100\], got 0"),
    ("task.augment.noise_std=-1", r"task\.augment\.noise_std must be in \[0, 64\], got -1"),
])
def test_config_refuses_an_out_of_range_augment_key(override, message):
    with pytest.raises(InputError, match=message):
        validate(compose_config("finetune_age", [override]), FinetuneAgeConfig)


def test_config_refuses_an_unknown_augment_key():
    with pytest.raises((ConfigCompositionException, ConfigKeyError, InputError)) as err:
        validate(compose_config("finetune_age", ["+task.augment.solarize_p=0.5"]), FinetuneAgeConfig)
    assert "solarize_p" in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize("quality", [[90, 30], [50], [10, 20, 30]])
def test_jpeg_quality_must_be_an_ordered_pair(quality):
    with pytest.raises(InputError, match=r"task\.augment\.jpeg_quality must be \[lo, hi\]"):
        augment_settings({"jpeg_quality": quality})


# ---------------------------------------------------------------- the tasks apply it in training only


class _Recorder(nn.Module):
    """A stand-in FaceModel that records the images it is given."""

    def __init__(self) -> None:
        from fahr.models import AgeHead
        from fahr.models.heads import RiskHead

        super().__init__()
        self.backbone = nn.Linear(1, 1)
        self.heads = nn.ModuleDict({"age": AgeHead(3, kind="distribution", min_age=0, max_age=100, bin_width=1),
                                    "risk": RiskHead(3, 0, [], 0.0)})
        self.seen: list[torch.Tensor] = []

    def features(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images)
        return images.float().mean(dim=(2, 3)) / 255 + self.backbone.weight

    def forward(self, images: torch.Tensor, covariates: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.heads["risk"](self.features(images))


def _age_task(augment: dict | None):
    from fahr.tasks.finetune_age import AgeTask

    task = {"loss": "l1", "label_sigma": 0.0, "hflip": False, "augment": augment}
    return AgeTask(_Recorder(), task, stage=2, stage_cfg={}, batch_size=4)


def _survival_task(augment: dict | None):
    from fahr.tasks.survival import SurvivalTask

    task = {"ties": "efron", "freeze_backbone": False, "hflip": False, "augment": augment, "base_lr": 1e-3}
    return SurvivalTask(_Recorder(), task, batch_size=4)


@pytest.mark.filterwarnings("ignore::UserWarning")  # self.log outside a Trainer
@pytest.mark.parametrize("make", [_age_task, _survival_task], ids=["age", "survival"])
def test_tasks_augment_training_batches_only(make):
    batch = {"image": faces(4), "age": torch.tensor([20.0, 30.0, 40.0, 50.0]),
             "time": torch.tensor([1.0, 2.0, 3.0, 4.0]), "event": torch.tensor([1, 0, 1, 1])}
    off = make(dict(DEFAULTS))
    off.training_step(batch, 0)
    assert off.model.seen[-1] is batch["image"]  # all off: the very tensor, untouched
    on = make({**DEFAULTS, "greyscale_p": 1.0})
    on.training_step(batch, 0)
    seen = on.model.seen[-1]
    assert torch.equal(seen[:, 0], seen[:, 2]) and not torch.equal(seen, batch["image"])
    on.validation_step(batch, 0)
    assert on.model.seen[-1] is batch["image"]  # validation is never augmented


@pytest.mark.parametrize("make", [_age_task, _survival_task], ids=["age", "survival"])
def test_tasks_refuse_a_bad_augment_config_before_training(make):
    with pytest.raises(InputError, match="jpeg_quality"):
        make({**DEFAULTS, "jpeg_p": 0.5, "jpeg_quality": [90, 30]})
