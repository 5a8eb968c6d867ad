# UnCoL-MONAI: `make demo` and `make test` are the Quick start (see README.md).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TRAIN := bundle/configs/train.json
BUNDLE_RUN := $(PY) -m monai.bundle run

.PHONY: install demo test lint format clean bundle label-install label-serve

# torch + torchvision first and on their own (pinned pair), then everything else under the lock file.
$(STAMP): requirements-torch.txt requirements.txt requirements-dev.txt constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-torch.txt
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt -c constraints.txt
	touch $(STAMP)

install: $(STAMP)

# MONAI Label in its own environment: monailabel 0.8.5 needs pydicom 2 and jsonschema 3 (see
# requirements-label.txt); the bundle runs inside it as MONAI Label's stock app loads it. What it
# shares with .venv at the same version (torch, CUDA libraries, ITK, ...) is hard-linked from there.
LABEL_VENV ?= .venv-label
LABEL_STAMP := $(LABEL_VENV)/.installed
$(LABEL_STAMP): $(STAMP) requirements-torch.txt requirements-label.txt constraints-label.txt
	test -x $(LABEL_VENV)/bin/python || python3 -m venv $(LABEL_VENV)
	$(PY) scripts/link_packages.py --source $(VENV) --target $(LABEL_VENV) requirements-torch.txt constraints-label.txt
	$(LABEL_VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements-torch.txt -r requirements-label.txt -c constraints-label.txt
	touch $(LABEL_STAMP)

label-install: $(LABEL_STAMP)

# Serve dist/uncol_monai (make bundle) in MONAI Label's stock monaibundle app on 127.0.0.1:8000,
# labelling the images in STUDIES (default: the embedded test split).
STUDIES ?= bundle/data/phantom2d/imagesTs
# The bundle ships the trained student when there is one (make demo); without it the server starts untrained.
label-serve: install label-install
	$(PY) scripts/make_bundle.py --out dist $$(test -f bundle/models/model.pt || echo --no-weights)
	$(LABEL_VENV)/bin/python scripts/monailabel_server.py --bundle dist/uncol_monai --studies $(STUDIES)

EVALUATE := $(BUNDLE_RUN) evaluate --config_file "['$(TRAIN)','bundle/configs/evaluate.json']"

# The whole UnCoL pipeline on the embedded 2D data: stage 1 (distillation from LiteMedSAM), stage 2
# (EMA + generalized teacher, entropy-gated pseudo-labels), inference on the test split, evaluation
# of both students, test Dice per class side by side.
demo: install
	@start=$$(date +%s); \
	$(BUNDLE_RUN) pretrain --config_file "['$(TRAIN)','bundle/configs/pretrain.json']" && \
	$(BUNDLE_RUN) training --config_file $(TRAIN) && \
	$(BUNDLE_RUN) inference --config_file bundle/configs/inference.json && \
	$(EVALUATE) --ckpt_path bundle/models/pretrain.pt --report_dir bundle/eval/report_stage1 && \
	$(EVALUATE) && \
	$(PY) -m custom.handlers.class_report "stage 1=bundle/eval/report_stage1/report.json" \
		"UnCoL (stage 2)=bundle/eval/report/report.json" && \
	echo "demo finished in $$(( $$(date +%s) - start )) s; segmentations in bundle/eval/segmentations, reports in bundle/eval/"

# Self-contained model-zoo style bundle (configs, user docs, custom/ code, model.pt + its TorchScript model.ts):
# dist/uncol_monai/ and dist/uncol_monai.zip. Run `make demo` (or your own training) first for weights.
bundle: install
	$(PY) scripts/make_bundle.py --out dist

# pytest-xdist workers (tests/conftest.py gives each one torch thread): the reference machine's 2 cores
TEST_WORKERS ?= 2
test: install label-install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=20 tests research/tests

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

clean:
	rm -rf bundle/eval bundle/data bundle/models/*.pt dist
