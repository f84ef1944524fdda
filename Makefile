# Every target sets up what it needs in a virtual environment (.venv by default).
# TORCH_SPEC picks the torch build: the default is the CPU wheel that this kind of machine
# carries on disk; on a GPU machine use e.g. `make test TORCH_SPEC=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test lint docs bench demo-time clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The curvature peers used as test oracles are pinned here and installed without their
# declared dependencies: backpack declares torchvision, which would replace the torch
# installed first with another (CUDA) build. Their real run-time dependencies are in the
# `test` extra. Everything after torch is constrained to the torch installed first.
ORACLES := curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1

# The demo needs the runtime and matplotlib only; the tests add their extras on top.
$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip freeze | grep -i '^torch==' > $(VENV)/constraints.txt
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e ".[plot]"
	touch $@

$(VENV)/.installed: $(VENV)/.runtime
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e ".[test,plot,dev,docs]"
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt --no-deps $(ORACLES)
	touch $@

demo: $(VENV)/.runtime
	$(BIN)/laplacefim demo
	@echo "environment $(VENV): $$(du -sh $(VENV) | cut -f1)"

test: $(VENV)/.installed
	$(BIN)/python -m pytest
	@echo "environment $(VENV): $$(du -sh $(VENV) | cut -f1)"

lint: $(VENV)/.installed
	$(BIN)/ruff check laplacefim tests examples benchmarks
	$(BIN)/mypy

# The documentation site (mkdocs.yml) into site/; --strict fails on a broken link.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
	@echo "site: $$(pwd)/site/index.html"

demo-time: $(VENV)/.runtime
	$(BIN)/python benchmarks/demo_time.py

bench:
	bash benchmarks/setup_bench_env.sh
	.venv-bench/bin/python benchmarks/fit.py

clean:
	rm -rf $(VENV) .venv-bench
