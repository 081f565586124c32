# Pomona's two entry points: `make run` (demo cluster) and `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test install install-test model protos lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(TEST_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $@ $(STAMP)

install: $(STAMP)
install-test: $(TEST_STAMP)

# Fetch the default model (SmolLM2-135M-Instruct GGUF) into the cache, unless it is there already.
model: $(STAMP)
	$(VENV)/bin/pomona fetch

run: model
	$(VENV)/bin/pomona up cluster.yaml
	$(VENV)/bin/pomona generate "What is the capital of France?" ; status=$$? ; \
	  $(VENV)/bin/pomona down ; exit $$status

test: $(TEST_STAMP)
	$(VENV)/bin/pomona fetch
	deploy/install_test_deps.sh
	$(VENV)/bin/python -m pytest -q

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .

protos: $(TEST_STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH deploy/gen_protos.sh

bench: model
	$(PY) bench/pipeline_bench.py

clean:
	rm -rf $(VENV) .pomona
