# Two commands on a bare machine:
#   make book   set up .venv and build the book from the notebooks' stored outputs (EXECUTE=1 re-runs them)
#   make test   run the whole test suite in the small configuration (sets up first if needed)
#   make browser  build the book, then open every page in headless Chromium (tests/browser; part of make test)
#   make bench  install the peers (anomalib, faiss-cpu) and run the kernel benchmark (QUICK=1: small sizes)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
EXECUTE ?= 0
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))

.PHONY: setup book mathjax test unit quick notebooks browser browser-deps bench clean

$(STAMP): pyproject.toml constraints.txt
	@start=$$(date +%s); \
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[book,test]" && touch $(STAMP); \
	echo "[timing] setup: $$(( $$(date +%s) - start ))s"

setup: $(STAMP)

# MathJax 3 served by the book (npm -> _vendor/mathjax); without npm it says why and the book keeps the CDN.
mathjax:
	@bash tools/fetch_mathjax.sh

book: setup mathjax
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

test: setup unit notebooks browser

unit: setup
	@start=$$(date +%s); \
	$(BIN)/python -m pytest tests --durations=15; rc=$$?; \
	ADLIB_NO_CTYPES=1 $(BIN)/python -m pytest tests/test_kernels.py -q || { rc2=$$?; [ $$rc -ne 0 ] || rc=$$rc2; }; \
	echo "[timing] unit tests (+ kernels with ADLIB_NO_CTYPES=1): $$(( $$(date +%s) - start ))s"; exit $$rc

# The fast half, for the edit-test loop: every test not marked slow (the whole set is `make unit`).
quick: setup
	$(BIN)/python -m pytest tests -m "not slow" -q

notebooks: setup
	@start=$$(date +%s); \
	cd notebooks && ADLIB_SMALL=1 ../$(BIN)/python -m pytest --nbval-lax -p no:cacheprovider $(notdir $(NOTEBOOKS)); rc=$$?; \
	echo "[timing] notebooks (nbval, small configuration): $$(( $$(date +%s) - start ))s"; exit $$rc

# Every page of the built book in headless Chromium: console errors, images, internal links, math, search.
# tools/browser_deps.sh installs chromium, chromium-driver (and npm, for MathJax) where CI=true and root;
# elsewhere it installs nothing and the test says why it skips.
browser-deps:
	@bash tools/browser_deps.sh

browser: browser-deps book
	@start=$$(date +%s); \
	$(BIN)/python -m pytest tests/browser --confcutdir=tests/browser -p no:cacheprovider; rc=$$?; \
	echo "[timing] browser (every page of _build/html in headless Chromium): $$(( $$(date +%s) - start ))s"; exit $$rc

bench: setup
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[bench]"
	$(BIN)/python -m adlib.bench --out bench_results $(if $(QUICK),--quick,)

clean:
	rm -rf _build .pytest_cache
