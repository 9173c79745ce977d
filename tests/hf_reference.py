"""Reference outputs of transformers ViT / ViTMAE models, for tests/test_import_weights.py.

Run as ``python tests/hf_reference.py JOBS.json`` in a process that can import transformers (see
``hf_reference_env`` in test_import_weights.py: transformers >= 5.18 needs safetensors >= 0.8, newer
than fahr's pin, so it lives in its own ``--target`` directory put first on PYTHONPATH for this
process only). Imports nothing from fahr. Each job builds (or loads) a model, saves it natively and
writes its outputs on the given inputs:

    {"class": "ViTMAEForPreTraining" | "ViTMAEModel" | "ViTModel",
     "config": {...} (build a random model, seeded) or "load": DIR (from_pretrained, strictly),
     "seed": 0, "save": DIR, "layout": "pretrained" (save_pretrained) | "native" (the in-memory names),
     "inputs": FILE (safetensors: "images" (B, 3, S, S) normalised float32, optional "noise" (B, N)),
     "outputs": FILE}

Outputs (safetensors): ``cls`` (B, D) the class token after the final LayerNorm with every patch
visible (mask_ratio 0 for ViTMAE), and for ViTMAEForPreTraining ``loss`` (), ``logits`` (B, N, p*p*3)
and ``mask`` (B, N) with the given ``noise`` and the config's mask ratio.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file


def run(job: dict) -> None:
    cls = getattr(transformers, job["class"])
    config_cls = transformers.ViTMAEConfig if "MAE" in job["class"] else transformers.ViTConfig
    if "load" in job:
        # use_kernels=False: no hub kernels (they would be fetched from the network)
        model, info = cls.from_pretrained(job["load"], output_loading_info=True, use_kernels=False)
        problems = {k: v for k, v in info.items() if v}
        if problems:
            raise SystemExit(f"{job['load']}: transformers did not load it cleanly: {problems}")
    else:
        torch.manual_seed(job.get("seed", 0))
        model = cls(config_cls(**job["config"]))
        if "MAE" in job["class"]:
            # transformers 5.25 leaves a new ViTMAE's fixed sin-cos tables at zero (its _init_weights zeroes the
            # decoder's after initialize_weights set it; the encoder's is skipped as "already initialised").
            # Published checkpoints hold the tables: set them with transformers' own initialize_weights.
            embeddings = (model.vit if hasattr(model, "vit") else model).embeddings
            embeddings.patch_embeddings.projection._is_hf_initialized = False
            embeddings.initialize_weights()
            if hasattr(model, "decoder"):
                model.decoder.initialize_weights(embeddings.patch_embeddings.num_patches)
    model.eval()
    if job.get("save"):
        out = Path(job["save"])
        if job.get("layout", "pretrained") == "pretrained":
            model.save_pretrained(out)
        else:  # the module names of transformers 5.x (layers.N.attention.q_proj, mlp.fc1), as a state_dict has them
            out.mkdir(parents=True, exist_ok=True)
            model.config.save_pretrained(out)
            save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()},
                      str(out / "model.safetensors"), metadata={"format": "pt"})
    inputs = load_file(job["inputs"])
    results = {}
    with torch.no_grad():
        encoder = model.vit if hasattr(model, "vit") else model
        if "MAE" in job["class"]:
            ratio = model.config.mask_ratio
            model.config.mask_ratio = 0.0  # every patch visible: the class token sees the whole image
            results["cls"] = encoder(inputs["images"]).last_hidden_state[:, 0]
            model.config.mask_ratio = ratio
        else:
            results["cls"] = encoder(inputs["images"]).last_hidden_state[:, 0]
        if job["class"] == "ViTMAEForPreTraining":
            out = model(inputs["images"], noise=inputs["noise"])
            results.update(loss=out.loss.reshape(()), logits=out.logits, mask=out.mask)
    save_file({k: v.contiguous() for k, v in results.items()}, job["outputs"])


if __name__ == "__main__":
    for job in json.loads(Path(sys.argv[1]).read_text()):
        run(job)
    print(f"transformers {transformers.__version__}: {len(json.loads(Path(sys.argv[1]).read_text()))} jobs")
