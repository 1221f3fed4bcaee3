# Two commands on a bare machine:
#   make book   set up .venv and build the book from the notebooks' stored outputs (EXECUTE=1 re-runs them)
#   make test   run the whole test suite in the small configuration (sets up first if needed)
#   make bench  install the peers (anomalib, faiss-cpu) and run the kernel benchmark (QUICK=1: small sizes)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
EXECUTE ?= 0
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))

.PHONY: setup book test unit notebooks bench clean

$(STAMP): pyproject.toml constraints.txt
	@start=$$(date +%s); \
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[book,test]" && touch $(STAMP); \
	echo "[timing] setup: $$(( $$(date +%s) - start ))s"

setup: $(STAMP)

book: setup
	@if [ "$(EXECUTE)" = "1" ]; then \
	  start=$$(date +%s); \
	  for nb in $(NOTEBOOKS); do \
	    echo "executing $$nb"; \
	    $(BIN)/jupyter execute --inplace --timeout=7200 "$$nb" || exit 1; \
	    $(BIN)/python tools/strip_stderr.py "$$nb"; \
	  done; \
	  echo "[timing] execute notebooks: $$(( $$(date +%s) - start ))s"; \
	fi
	@start=$$(date +%s); \
	$(BIN)/jupyter-book build . --warningiserror --nitpick --keep-going && \
	echo "[timing] book: $$(( $$(date +%s) - start ))s -> _build/html/index.html"

test: setup unit notebooks

unit: setup
	@start=$$(date +%s); \
	$(BIN)/python -m pytest tests; rc=$$?; \
	echo "[timing] unit tests: $$(( $$(date +%s) - start ))s"; exit $$rc

notebooks: setup
	@start=$$(date +%s); \
	cd notebooks && ADLIB_SMALL=1 ../$(BIN)/python -m pytest --nbval-lax -p no:cacheprovider $(notdir $(NOTEBOOKS)); rc=$$?; \
	echo "[timing] notebooks (nbval, small configuration): $$(( $$(date +%s) - start ))s"; exit $$rc

bench: setup
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[bench]"
	$(BIN)/python -m adlib.bench --out bench_results $(if $(QUICK),--quick,)

clean:
	rm -rf _build .pytest_cache
