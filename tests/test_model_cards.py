"""README.md model cards: written beside model_card.json by every export, readable by a hub (YAML front
matter) and by a person (sections, evaluation per sex, race and age decade), generated from the card."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml

from fahr.metrics.age import age_metrics


def _front_matter_and_body(text: str) -> tuple[dict, str]:
    m = re.fullmatch(r"---\n(.*?)\n---\n(.*)", text, flags=re.S)
    assert m, "README.md must start with a YAML front matter block"
    return yaml.safe_load(m[1]), m[2]


def _table_row(body: str, first_cell: str) -> list[str]:
    (row,) = [line for line in body.splitlines() if line.startswith(f"| {first_cell} |")]
    return [c.strip() for c in row.strip("|").split("|")]


def _faceage_model(tmp_path, metrics: dict) -> None:
    from fahr.models import FaceModel, create_backbone, save_face_model
    from fahr.models.heads import build_head

    backbone = create_backbone("vit_test", img_size=32)
    model = FaceModel(backbone, {"age": build_head("age", backbone.num_features, {})}, [0.5] * 3, [0.25] * 3)
    save_face_model(tmp_path, model, {"task": "faceage", "metrics": metrics,
                                      "training_data": {"name": "utkface", "photos": {"train": 1200, "val": 300}}})


def test_faceage_card_readme_holds_front_matter_sections_and_exact_group_figures(tmp_path):
    true = np.array([23.0, 27.0, 35.0, 41.0, 44.0, 68.0])
    pred = np.array([25.0, 26.0, 31.0, 45.0, 44.0, 60.0])
    sex = np.array([0, 1, 1, 0, 1, np.nan])
    metrics = {f"test/{k}": v for k, v in age_metrics(pred, true, {"sex": sex}).items()}
    _faceage_model(tmp_path, metrics)
    front, body = _front_matter_and_body((tmp_path / "README.md").read_text())
    assert front == {"license": "other", "library_name": "fahr",
                     "tags": ["fahr", "face", "vision-transformer", "faceage", "health", "medical"],
                     "datasets": ["utkface"], "metrics": ["cs5", "mae", "mean_error", "pearson_r"]}
    for section in ("Intended use", "Out-of-scope use", "Training data", "Evaluation", "Limitations", "How to load"):
        assert f"\n## {section}\n" in body
    assert _table_row(body, "test | cs5") == ["test", "cs5", "0.833"]  # errors 2, 1, 4, 4, 0, 8: 5 of 6 within 5 years
    # sex 0 (male): errors 2, 4 -> MAE 3.0, signed +3.0; sex 1 (female): 1, 4, 0 -> 1.667, -1.667
    assert _table_row(body, "male") == ["male", "2", "3.000", "3.000"]
    assert _table_row(body, "female") == ["female", "3", "1.667", "-1.667"]
    assert _table_row(body, "60-69") == ["60-69", "1", "8.000", "-8.000"]
    assert "Per race: not computed (the test data had no race labels)." in body
    assert "- Photos: train 1,200, val 300" in body


def test_every_export_format_writes_a_readme_from_its_card(tmp_path):
    from fahr.models import TableRiskModel, create_backbone, save_backbone, save_table_model
    from fahr.models.weights import model_card

    encoder = create_backbone("vit_test", img_size=32)
    save_backbone(tmp_path / "b", encoder.state_dict(), model_card(encoder, task="mae_pretrain", global_step=1234,
                                                                   license="cc-by-nc-4.0"))
    front, body = _front_matter_and_body((tmp_path / "b" / "README.md").read_text())
    assert front["license"] == "cc-by-nc-4.0" and "masked-autoencoder" in front["tags"] and front["metrics"] == []
    assert "- Pretraining steps: 1,234" in body and "Licence: not set" not in body

    scaler = {"features": ["age", "stage"], "mean": [60.0, 2.0], "std": [10.0, 1.0]}
    save_table_model(tmp_path / "t", TableRiskModel(2, [], 0.0),
                     {"task": "facesurvival", "covariates": scaler, "metrics": {"test_c_index": 0.712, "val_c_index": 0.70}})
    front, body = _front_matter_and_body((tmp_path / "t" / "README.md").read_text())
    assert front["metrics"] == ["c_index"] and "tabular" in front["tags"]
    assert _table_row(body, "test | c_index") == ["test", "c_index", "0.712"]
    assert "2 table features (age, stage)" in body and "Licence: not set" in body


def test_readme_of_a_card_with_hostile_text_stays_one_line_per_fact(tmp_path):
    """Card values are data: a name with newlines or Markdown cannot add sections or front matter keys."""
    _faceage_model(tmp_path, {"test/mae": 5.0})
    card = json.loads((tmp_path / "model_card.json").read_text())
    card["training_data"]["name"] = "x\n---\nlicense: mit\n## Intended use\nanything"
    from fahr.models.model_readme import model_readme

    front, body = _front_matter_and_body(model_readme(card))
    assert front["license"] == "other" and front["datasets"] == [card["training_data"]["name"]]
    assert body.count("\n## Intended use\n") == 1
    assert "- Data set: x --- license: mit ## Intended use anything" in body


@pytest.mark.parametrize("fmt", ["fahr-backbone/1", "fahr-model/1", "fahr-table-model/1"])
def test_readme_is_regenerated_with_each_export(tmp_path, fmt):
    """A rerun of an export into the same folder rewrites README.md too (never a stale card)."""
    from fahr.models import TableRiskModel, create_backbone, save_backbone, save_table_model

    if fmt == "fahr-backbone/1":
        encoder = create_backbone("vit_test", img_size=32)
        write = lambda step: save_backbone(tmp_path, encoder.state_dict(), {"arch": "vit_test", "img_size": 32,  # noqa: E731
                                                                           "patch_size": 16, "global_step": step})
    elif fmt == "fahr-model/1":
        write = lambda step: _faceage_model(tmp_path, {"test/mae": float(step)})  # noqa: E731
    else:
        scaler = {"features": ["a"], "mean": [0.0], "std": [1.0]}
        write = lambda step: save_table_model(tmp_path, TableRiskModel(1, [], 0.0),  # noqa: E731
                                              {"covariates": scaler, "metrics": {"test_c_index": step / 10}})
    write(3)
    first = (tmp_path / "README.md").read_text()
    write(7)
    second = (tmp_path / "README.md").read_text()
    assert first != second
