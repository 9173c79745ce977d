# The README's two commands: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FACENET := facenet-pytorch==2.6.0
# benchmarks/align.py's baseline: FaceAge's own detector (ipazc mtcnn on TensorFlow), in its own venv
FACEAGE_BASELINE := .cache/faceage-baseline
FACEAGE_BASELINE_PINS := tensorflow-cpu==2.21.0 mtcnn==1.0.0 pillow==12.0.0
# tests/test_import_weights.py's reference (test-only): transformers builds the ViT / ViTMAE models fahr
# imports and computes their outputs, in a subprocess. No transformers release fits our pins together:
# >= 5.18 needs safetensors >= 0.8 (we pin 0.7.0), 5.0-5.17 and 4.x need huggingface_hub < 2 (we pin
# 2.4.0). So it goes to its own folder (pip --target), put first on PYTHONPATH by that subprocess only.
HF_REFERENCE := .cache/hf-reference
HF_REFERENCE_PINS := transformers==5.25.0 safetensors==0.8.0 tokenizers==0.23.3 regex==2026.12.2
# Keep every cache inside the workspace (CI and shared machines).
export MPLCONFIGDIR := $(CURDIR)/.cache/matplotlib
export WANDB_DIR := $(CURDIR)/.cache/wandb
export WANDB_CACHE_DIR := $(CURDIR)/.cache/wandb
export WANDB_CONFIG_DIR := $(CURDIR)/.cache/wandb
export TORCH_HOME := $(CURDIR)/.cache/torch
export HF_HOME := $(CURDIR)/.cache/huggingface
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions

BENCHMARKS := $(patsubst benchmarks/%.py,%,$(filter-out benchmarks/_%,$(wildcard benchmarks/*.py)))

.PHONY: venv faceage-baseline hf-reference demo test bench $(addprefix bench-,$(BENCHMARKS)) clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip==25.3"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	# facenet-pytorch (MTCNN, weights inside the wheel) declares torch<2.3 and numpy<2 although it runs
	# with ours: installed without its dependency pins, or pip would fetch a second torch.
	$(PY) -m pip install --quiet --no-deps "$(FACENET)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fahr demo

hf-reference: $(HF_REFERENCE)/.installed

$(HF_REFERENCE)/.installed: $(STAMP) Makefile
	rm -rf $(HF_REFERENCE)
	$(PY) -m pip install --quiet --no-deps --target $(HF_REFERENCE) $(HF_REFERENCE_PINS)
	touch $@

test: $(STAMP) $(HF_REFERENCE)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# the hyperparameter search (~25 min) is a tuning tool, not a measurement: only on request
bench: $(addprefix bench-,$(filter-out survival_search,$(BENCHMARKS)))

$(addprefix bench-,$(BENCHMARKS)): bench-%: $(STAMP)
	$(PY) benchmarks/$*.py

# Only the align benchmark needs it (~600 MB); never the tests or the demo.
faceage-baseline: $(FACEAGE_BASELINE)/.installed

$(FACEAGE_BASELINE)/.installed:
	test -x $(FACEAGE_BASELINE)/bin/python || $(PYTHON) -m venv $(FACEAGE_BASELINE)
	$(FACEAGE_BASELINE)/bin/python -m pip install --quiet $(FACEAGE_BASELINE_PINS)
	touch $@

bench-align: $(FACEAGE_BASELINE)/.installed

clean:
	rm -rf runs data/synthetic_faces .cache .pytest_cache
