# mtlsparse — set-up, run, test, bench, sweep. `make run` and `make test` install what they need into the
# active Python environment (use a virtualenv: python3 -m venv .venv && . .venv/bin/activate).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# one stamp per interpreter environment: a new virtualenv installs afresh
STAMP := $(shell $(PYTHON) -c 'import sys; print(sys.prefix)')/.mtlsparse-setup-$(notdir $(CURDIR)).stamp

.PHONY: setup setup-slurm test-slurm run test test-slow lint bench bench-export bench-trunk sweep clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's Fashion-MNIST (dataset-fashion-mnist)"; \
		(apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null \
		|| echo "warning: could not install dataset-fashion-mnist; set dataset.download=true on an online machine"; \
	fi
	$(PIP) install -q -e ".[dev]"
	@touch $(STAMP)

# Slurm + munge (Debian) for the real-Slurm tests; they start a throwaway single-node cluster themselves
setup-slurm: setup
	command -v slurmctld >/dev/null 2>&1 || (apt-get install -y -q slurm-wlm munge || (apt-get update -q && apt-get install -y -q slurm-wlm munge))

test-slurm: setup-slurm
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest tests/test_slurm.py -m "slow or not slow" $(ARGS)

run: setup
	$(PYTHON) -m mtlsparse $(ARGS)

lint: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -c "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"

# pytest-xdist: one worker per core (each worker runs torch on one thread, tests/conftest.py); TEST_WORKERS=0 runs serially
TEST_WORKERS ?= auto

test: setup lint
	$(PYTHON) -m pytest -n $(TEST_WORKERS) $(ARGS)

test-slow: setup
	$(PYTHON) -m pytest -n $(TEST_WORKERS) -m slow $(ARGS)

bench: setup
	$(PYTHON) -m mtlsparse.benchmarks.balancers $(ARGS)

bench-export: setup
	$(PYTHON) -m mtlsparse.benchmarks.export $(ARGS)

# trunk once per batch vs once per task, 3-task NYUv2-shaped training, mixed precision (meant for a GPU)
bench-trunk: setup
	$(PYTHON) -m mtlsparse.benchmarks.trunk $(ARGS)

sweep: setup
	$(PYTHON) -m mtlsparse -m +sweep=lambda_group_lasso $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache build dist
