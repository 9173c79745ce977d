import math

import pytest

from fahr.tasks.optim import param_groups
from fahr.tasks.schedules import scaled_lr, warmup_cosine


def test_linear_scaling_rule():
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
    assert scaled_lr(1e-3, 256) == 1e-3


def test_warmup_cosine_exact_values():
    peak, warm, total = 1.0, 10, 110
    assert warmup_cosine(0, peak, warm, total) == pytest.approx(0.1)
    assert warmup_cosine(9, peak, warm, total) == pytest.approx(1.0)
    assert warmup_cosine(10, peak, warm, total) == pytest.approx(1.0)
    assert warmup_cosine(60, peak, warm, total) == pytest.approx(0.5)  # half-way through the cosine
    assert warmup_cosine(35, peak, warm, total) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert warmup_cosine(110, peak, warm, total, min_lr=0.1) == 0.1
    assert warmup_cosine(500, peak, warm, total, min_lr=0.1) == 0.1


def test_weight_decay_exclusions():
    from fahr.models import MaskedAutoencoder, create_backbone

    mae = MaskedAutoencoder(create_backbone("vit_test"))
    decay, no_decay = param_groups(mae, 0.05, mae.no_weight_decay())
    names = {id(p): n for n, p in mae.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {"encoder.pos_embed", "encoder.cls_token", "decoder.mask_token"} <= no_decay_names
    assert all(not n.endswith(".bias") and "norm" not in n for n in decay_names)
    assert "encoder.blocks.0.attn.qkv.weight" in decay_names
    assert len(decay_names) + len(no_decay_names) == len(list(mae.parameters()))
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
