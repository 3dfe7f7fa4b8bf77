# The README's two set-up commands are `make demo` and `make test`; both create .venv when it is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
SPLIT   ?= K1
BACKBONE ?= i3d
DEVICE  ?= auto

.PHONY: demo test extract manifests bench sweep clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[extract,trackers,slurm]'
	touch $(STAMP)

manifests: $(STAMP)
	$(BIN)/adapt convert-manifests ../shared/data/manifests

demo: $(STAMP)
	$(BIN)/adapt demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

extract: $(STAMP)
	$(BIN)/adapt extract --split $(SPLIT) --backbone $(BACKBONE) --device $(DEVICE)

sweep: $(STAMP)
	$(BIN)/adapt sweep bench/demo_sweep.toml

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) demo runs features/*/
