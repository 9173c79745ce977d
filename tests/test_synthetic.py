"""Behaviour of the procedural synthetic faces: determinism, label ranges, learnable age, visible health."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fahr.data.synthetic import (
    AGE_MAX,
    AGE_MIN,
    SyntheticFaceSpec,
    render_face,
    sample_spec,
    synthetic_face,
)

N_FACES = 600
SEED = 7


@pytest.fixture(scope="module")
def faces():
    """(N, 112, 112, 3) uint8 images and their label arrays for seed 7."""
    images, ages, sexes, healths = [], [], [], []
    for i in range(N_FACES):
        image, labels = synthetic_face(i, SEED)
        images.append(image)
        ages.append(labels["age"])
        sexes.append(labels["sex"])
        healths.append(labels["health"])
    return np.stack(images), np.array(ages), np.array(sexes), np.array(healths)


def test_same_seed_and_index_give_identical_bytes():
    a, la = synthetic_face(11, 3)
    b, lb = synthetic_face(11, 3)
    assert a.tobytes() == b.tobytes() and la == lb


def test_spec_depends_only_on_seed_and_index_not_call_order():
    first = sample_spec(42, 5)
    for i in range(10):
        sample_spec(i, 5)
    assert sample_spec(42, 5) == first


def test_different_index_or_seed_gives_different_faces():
    base, _ = synthetic_face(0, 0)
    assert not np.array_equal(base, synthetic_face(1, 0)[0])
    assert not np.array_equal(base, synthetic_face(0, 1)[0])


def test_render_is_a_pure_function_of_the_spec():
    spec = sample_spec(3, 9)
    older = dataclasses.replace(spec, age=min(AGE_MAX, spec.age + 30))
    assert np.array_equal(render_face(spec), synthetic_face(3, 9)[0])
    assert not np.array_equal(render_face(spec), render_face(older))


@pytest.mark.parametrize("size", [112, 64])
def test_image_shape_and_dtype(size):
    image, _ = synthetic_face(2, 0, size=size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert image.std() > 10  # not blank


def test_labels_in_range_and_marked_synthetic(faces):
    _, ages, sexes, healths = faces
    _, labels = synthetic_face(0, SEED)
    assert set(labels) == {"age", "sex", "health", "synthetic"} and labels["synthetic"] is True
    assert ages.min() >= AGE_MIN and ages.max() <= AGE_MAX
    assert set(np.unique(sexes)) == {0, 1}
    assert 0.4 < sexes.mean() < 0.6
    assert healths.min() >= 0.0 and healths.max() <= 1.0
    # roughly uniform ages; health mildly worse with age
    assert abs(ages.mean() - (AGE_MIN + AGE_MAX) / 2) < 4
    assert np.histogram(ages, bins=6, range=(AGE_MIN, AGE_MAX))[0].min() > N_FACES / 6 * 0.6
    r = np.corrcoef(ages, healths)[0, 1]
    assert -0.6 < r < -0.1


def test_spec_validation():
    with pytest.raises(ValueError, match="age"):
        SyntheticFaceSpec(age=5.0, sex=0, health=0.5)
    with pytest.raises(ValueError, match="sex"):
        SyntheticFaceSpec(age=30.0, sex=2, health=0.5)
    with pytest.raises(ValueError, match="health"):
        SyntheticFaceSpec(age=30.0, sex=1, health=1.5)
    with pytest.raises(ValueError):
        sample_spec(-1, 0)


def _ridge_predict(x_train, y_train, x_test, lam):
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    a = np.c_[(x_train - mu) / sd, np.ones(len(x_train))]
    b = np.c_[(x_test - mu) / sd, np.ones(len(x_test))]
    reg = lam * np.eye(a.shape[1])
    reg[-1, -1] = 0.0  # do not shrink the intercept
    w = np.linalg.solve(a.T @ a + reg, a.T @ y_train)
    return b @ w


def test_age_is_learnable_from_downsampled_grayscale(faces):
    images, ages, _, _ = faces
    gray = images.astype(np.float32).mean(-1)
    x = gray.reshape(len(gray), 28, 4, 28, 4).mean((2, 4)).reshape(len(gray), -1)  # 28x28
    n_train = 450
    pred = _ridge_predict(x[:n_train], ages[:n_train], x[n_train:], lam=30.0)
    mae = np.abs(pred - ages[n_train:]).mean()
    baseline = np.abs(ages[:n_train].mean() - ages[n_train:]).mean()
    assert mae < 0.6 * baseline, (mae, baseline)


def test_health_visible_in_cheek_saturation(faces):
    images, ages, _, healths = faces
    # both cheeks, around (u, v) = (0.5 +- 0.17, 0.56)
    cheeks = np.concatenate([images[:, 56:70, 30:44], images[:, 56:70, 68:82]], axis=1).astype(np.float32)
    hi, lo = cheeks.max(-1), cheeks.min(-1)
    saturation = ((hi - lo) / (hi + 1e-6)).mean((1, 2))
    assert np.corrcoef(healths, saturation)[0, 1] > 0.3
    # not merely through the age correlation: still there with age regressed out
    design = np.c_[ages, np.ones_like(ages)]

    def resid(y):
        return y - design @ np.linalg.lstsq(design, y, rcond=None)[0]

    assert np.corrcoef(resid(healths), resid(saturation))[0, 1] > 0.25


def test_layout_is_aligned_like_a_face_crop(faces):
    images = faces[0][:200].astype(np.float32).mean(-1)
    mean_face = images.mean(0)
    eye_row = round(0.385 * 112)
    left, right = round((0.5 - 0.155) * 112), round((0.5 + 0.155) * 112)
    eyes = (mean_face[eye_row, left] + mean_face[eye_row, right]) / 2
    cheek = mean_face[round(0.56 * 112), left]
    assert eyes < cheek - 20  # iris/pupil are darker than the skin around them
    mouth_row = round(0.72 * 112)
    column = mean_face[round(0.62 * 112) : round(0.8 * 112), 56]
    assert abs(int(column.argmin()) + round(0.62 * 112) - mouth_row) <= 3  # darkest: the lip line
