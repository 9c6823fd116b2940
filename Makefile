# Two commands do everything on a fresh machine:  `make study`  and  `make test`.
# Both create .venv on first use (CPU torch first, so no CUDA build is pulled in), then reuse it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
CORES ?= 2
PYTEST_ARGS ?=

.PHONY: study test lint clean-results

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

study: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" snakemake --profile workflow/profiles/default --cores $(CORES)
	@cat results/report/models.md

test: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" snakemake --lint --cores 1

clean-results:
	rm -rf results/data results/tokenizer results/models results/eval results/report results/logs results/benchmarks
