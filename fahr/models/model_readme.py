"""The human- and hub-readable model card: ``README.md`` beside ``model_card.json`` in every export.

:func:`model_readme` renders a checked card (any format fahr writes) as Markdown with YAML front matter
(``license``, ``library_name``, ``tags``, ``datasets``, ``metrics``: the keys the Hugging Face hub
reads) and the sections a reader of a health model needs: intended use, out-of-scope use, training
data, evaluation (overall, and per sex, race and age decade where the test data had those labels)
and limitations. Everything in it comes from the card; the card stays the machine-readable truth.
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml

#: label codes shared by every fahr data source (data_pipelines/records.py)
GROUP_LABELS = {
    "sex": {"0": "male", "1": "female"},
    "race": {"0": "White", "1": "Black", "2": "Asian", "3": "Indian", "4": "other"},
}
README_FILE = "README.md"

_TASKS = {
    "mae_pretrain": ("fahr face foundation backbone (MAE-pretrained ViT)", "masked-autoencoder"),
    "imported": ("ViT backbone imported from published weights (fahr import-weights)", "vision-transformer"),
    "faceage": ("FAHR-FaceAge: biological age from a face photograph", "faceage"),
    "facesurvival": ("FAHR-FaceSurvival: Cox risk from a face photograph", "facesurvival"),
}

_INTENDED_BACKBONE = [
    "A starting point for fine-tuning on aligned 5-point face crops: `fahr finetune-age backbone=<this folder>`, "
    "`fahr finetune-survival backbone=<this folder>`, or continued pretraining.",
    "Research on face representations for health.",
]

_INTENDED = {
    "imported": _INTENDED_BACKBONE,
    "mae_pretrain": _INTENDED_BACKBONE,
    "faceage": [
        "Research on biological age estimated from face photographs (FaceAge), e.g. as a biomarker "
        "studied against outcomes in a cohort, or the Face Aging Rate between two photos of a person "
        "(`fahr far`).",
        "Population-level analyses (hazard ratios, group comparisons) with the statistics in `fahr evaluate`.",
    ],
    "facesurvival": [
        "Research on prognosis from face photographs: a log-hazard per photo or patient, studied with "
        "adjusted Cox models, risk groups and C-index (`fahr evaluate`).",
    ],
}

_OUT_OF_SCOPE = [
    "Decisions about an individual person's care, treatment, insurance, employment or eligibility: this "
    "model is not a medical device and has not been validated for clinical use.",
    "Identifying or tracking people, or age verification for legal purposes.",
    "Photos unlike the training photos (other crops, alignment, lighting, devices, children when training "
    "had few) without first measuring the error on such photos.",
]

_LIMITATIONS = {
    "imported": ["Features only: nothing here is a prediction until a head is fine-tuned and evaluated.",
                 "What the source was trained on, and its terms, are the source's: see its own model card."],
    "mae_pretrain": ["Features only: nothing here is a prediction until a head is fine-tuned and evaluated."],
    "faceage": [
        "Age estimates regress to the mean (young faces over-, old faces under-estimated); the table by "
        "decade shows by how much, and `age_calibration` in model_card.json records the linear correction "
        "applied, if any.",
        "Error differs between groups of sex, race and age; groups absent or small in the test data are "
        "not covered by the figures above.",
    ],
    "facesurvival": [
        "A risk score, not a survival time: its meaning is relative to the training cohort (cancer site, "
        "stage, treatment era, follow-up); recalibrate before using absolute risks elsewhere.",
        "The C-index and hazard ratios hold for the cohort evaluated; other cohorts need their own evaluation.",
    ],
}


def model_readme(card: dict[str, Any]) -> str:
    """Markdown text (front matter + sections) for a checked model card (see :mod:`fahr.models.weights`)."""
    task = card.get("task") or ("mae_pretrain" if card["format"] == "fahr-backbone/1" else "")
    title, task_tag = _TASKS.get(task, (f"fahr model ({card['format']})", None))
    data = card.get("training_data") if isinstance(card.get("training_data"), dict) else {}
    metrics = {k: v for k, v in (card.get("metrics") or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    front = {
        "license": str(card.get("license") or "other"),
        "library_name": "fahr",
        "tags": [t for t in ("fahr", "face", "vision-transformer", task_tag, "health", "medical") if t]
        if card["format"] != "fahr-table-model/1" else ["fahr", "survival-analysis", "deepsurv", "tabular", "health"],
        "datasets": [str(data["name"])] if data.get("name") else [],
        "metrics": sorted({_metric_id(k) for k in metrics if _metric_id(k)}),
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {title}", ""]
    lines += [_summary(card), ""]
    source = card.get("source")
    if isinstance(source, dict) and source:
        facts = ", ".join(f"{k} {_one_line(v, 80)}" for k, v in source.items() if isinstance(v, (str, int, float)))
        lines += [f"Converted from published weights: {facts}.", ""]
    elif source:
        lines += [f"Converted from published weights: {_one_line(source)}.", ""]
    if not card.get("license"):
        lines += ["Licence: not set. The terms of the training data decide what the weights may be used for "
                  "(e.g. UTKFace and CACD are for non-commercial research); whoever releases this model sets it.", ""]
    lines += ["## Intended use", ""] + [f"- {t}" for t in _INTENDED.get(task, ["Research use."])] + [""]
    lines += ["## Out-of-scope use", ""] + [f"- {t}" for t in _OUT_OF_SCOPE] + [""]
    lines += ["## Training data", ""] + _training_data(card, data) + [""]
    lines += ["## Evaluation", ""] + _evaluation(metrics) + [""]
    lines += ["## Limitations", ""] + [f"- {t}" for t in _LIMITATIONS.get(task, [])]
    lines += ["- Synthetic training data: the weights show that the pipeline runs, they are not a model of real faces."
              if data.get("synthetic") else "- Trained and evaluated on the data named above only.", ""]
    lines += ["## How to load", "", "```python", "from fahr.models import load_export", "",
              "model, card = load_export(\"<this folder>\")  # safetensors + model_card.json, nothing unpickled",
              "```", ""]
    if card["format"] == "fahr-model/1":
        lines += ["```bash", "fahr predict model=<this folder> input=<photos or CSV> output=predictions.csv", "```", ""]
    lines += ["The machine-readable card is `model_card.json`; this page is generated from it.", ""]
    return "\n".join(lines)


def _one_line(value: Any, limit: int = 200) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _metric_id(key: str) -> str | None:
    """``test/mae`` -> ``mae``; subgroup keys and counts give none."""
    parts = key.replace("_", "/", 1).split("/") if key.startswith(("test_", "val_")) else key.split("/")
    if len(parts) != 2 or parts[0] != "test" or parts[1] in ("n", "skipped"):
        return None
    return parts[1]


def _summary(card: dict[str, Any]) -> str:
    fmt = card["format"]
    if fmt == "fahr-table-model/1":
        names = card.get("covariates", {}).get("features", [])
        return (f"A DeepSurv-style risk model on {card.get('num_features', len(names))} table features "
                f"({', '.join(map(str, names[:8]))}{', ...' if len(names) > 8 else ''}), standardised with the "
                "training mean and SD stored in model_card.json. Output: a log-hazard per row (higher = worse).")
    arch = card.get("backbone", card) if fmt == "fahr-model/1" else card
    vit = (f"a ViT ({arch.get('arch')}, patch {arch.get('patch_size')}, {arch.get('img_size')} x "
           f"{arch.get('img_size')} px, pooling: {arch.get('global_pool', 'token')})")
    if fmt == "fahr-backbone/1":
        return f"Image encoder: {vit}. Input: aligned RGB face crops; output: a feature vector per photo."
    heads = ", ".join(sorted(card.get("heads", {})))
    what = {"age": "FaceAge in years", "risk": "a log-hazard (higher = worse)"}
    outputs = "; ".join(what.get(h, h) for h in sorted(card.get("heads", {})))
    flip = " Predictions average each photo with its mirror image." if card.get("flip_average") else ""
    return f"Backbone: {vit}; heads: {heads}. Output per photo: {outputs}.{flip}"


def _training_data(card: dict[str, Any], data: dict[str, Any]) -> list[str]:
    out = []
    if data.get("name"):
        out.append(f"- Data set: {_one_line(data['name'])}" + (" (synthetic faces)" if data.get("synthetic") else ""))
    photos = data.get("photos")
    if isinstance(photos, dict):
        out.append("- Photos: " + ", ".join(f"{k} {v:,}" for k, v in photos.items() if isinstance(v, int)))
    for key, label in (("num_samples", "Samples"), ("samples_per_epoch", "Samples per epoch")):
        if isinstance(data.get(key), int):
            out.append(f"- {label}: {data[key]:,}")
    prep = card.get("preprocessing")
    if isinstance(prep, dict) and prep:
        shown = ", ".join(f"{k} {_one_line(v, 60)}" for k, v in prep.items() if v is not None)
        out.append(f"- Preprocessing (what `fahr predict` repeats): {shown}")
    if card.get("global_step") is not None:
        out.append(f"- Pretraining steps: {card['global_step']:,}")
    init = card.get("init")
    if isinstance(init, dict) and init.get("backbone"):
        out.append(f"- Initialised from: {_one_line(init['backbone'])}")
    return out or ["Not recorded in the card."]


def _evaluation(metrics: dict[str, float]) -> list[str]:
    """An overall table of the test (and validation) metrics and one table per group (sex, race, decade)."""
    flat = {k.replace("_", "/", 1) if k.startswith(("test_", "val_")) else k: v for k, v in metrics.items()}
    overall = [(k, v) for k, v in sorted(flat.items()) if k.count("/") == 1 and k.split("/")[0] in ("test", "val")]
    if not overall:
        return ["No evaluation recorded in the card (a backbone is evaluated through its fine-tunes)."]
    out = ["| split | metric | value |", "|---|---|---|"]
    out += [f"| {k.split('/')[0]} | {k.split('/')[1]} | {_fmt(v, k.split('/')[1] in ('n', 'skipped'))} |"
            for k, v in overall]
    groups: dict[str, dict[str, dict[str, float]]] = {}
    for key, value in flat.items():
        m = re.fullmatch(r"test/(mae|mean_error|n|c_index|hr_per_sd)/(sex|race|decade|[A-Za-z0-9_]+)/(.+)", key)
        if m:
            groups.setdefault(m[2], {}).setdefault(m[3], {})[m[1]] = value
    for name in ("sex", "race", "decade"):
        out.append("")
        rows = groups.get(name)
        if not rows:
            out.append(f"Per {name}: not computed (the test data had no {name} labels).")
            continue
        columns = sorted({c for r in rows.values() for c in r}, key=lambda c: (c != "n", c))
        out += [f"Test set by {'age decade (true age)' if name == 'decade' else name}:", "",
                f"| {name} | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for value in sorted(rows, key=lambda v: (len(v), v)):
            label = GROUP_LABELS.get(name, {}).get(value, value)
            out.append(f"| {label} | " + " | ".join(_fmt(rows[value].get(c), c == "n") for c in columns) + " |")
    return out


def _fmt(v: Any, count: bool = False) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return "-"
    return f"{int(v):,}" if count else f"{v:.3f}"
