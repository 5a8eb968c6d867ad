# UnCoL-MONAI: `make demo` and `make test` are the Quick start (see README.md).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TRAIN := bundle/configs/train.json
BUNDLE_RUN := $(PY) -m monai.bundle run

.PHONY: install demo test lint format clean

# torch + torchvision first and on their own (pinned pair), then everything else under the lock file.
$(STAMP): requirements-torch.txt requirements.txt requirements-dev.txt constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-torch.txt
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt -c constraints.txt
	touch $(STAMP)

install: $(STAMP)

# Generate the embedded data, train the student, segment the test split, print test Dice per class.
demo: install
	@start=$$(date +%s); \
	$(BUNDLE_RUN) training --config_file $(TRAIN) && \
	$(BUNDLE_RUN) inference --config_file bundle/configs/inference.json && \
	$(BUNDLE_RUN) evaluate --config_file "['$(TRAIN)','bundle/configs/evaluate.json']" && \
	echo "demo finished in $$(( $$(date +%s) - start )) s; segmentations in bundle/eval/segmentations, report in bundle/eval/report"

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

clean:
	rm -rf bundle/eval bundle/data bundle/models/*.pt
