# LossLab: `make train` and `make test` work on a fresh clone (they create .venv and install what is missing).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and on its own: the release pyproject.toml's range admits, as wheels for this platform.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= dev
STAMP := $(VENV)/.installed-$(EXTRAS)
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
PYTEST_ARGS ?=
# The suite runs in TEST_JOBS processes (pytest-xdist; one test file per process at a time, so a file's fixtures
# are built once); TEST_JOBS=0 runs it in this process.
TEST_JOBS ?= 2
ARGS ?=
SWEEP ?= fashion_mnist_losses
JOBS ?= 2
COMPARE_ARGS ?= --by loss --baseline ce

.PHONY: install data train test sweep compare lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@touch $@

# Fashion-MNIST from Debian's dataset-fashion-mnist when apt is usable; otherwise runs fall back to
# torchvision's download into paths.data_dir.
data:
	@if [ -f $(FASHION_MNIST) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "Installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	elif command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "dataset-fashion-mnist not installable here: LossLab will look in paths.data_dir, then download"; \
	fi

train: install data
	$(PY) scripts/train.py $(ARGS)

# A whole comparison (configs/sweep/$(SWEEP).yaml) with $(JOBS) jobs in parallel; launching it again
# finishes only the runs that are missing.
sweep: install data
	$(PY) scripts/train.py sweep=$(SWEEP) hydra/launcher=joblib hydra.launcher.n_jobs=$(JOBS) $(ARGS)

compare: install
	$(VENV)/bin/losslab-compare outputs/multirun/$(SWEEP) $(COMPARE_ARGS)

test: install data
	$(PY) -m pytest -n $(TEST_JOBS) --dist loadfile $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check src tests scripts

clean:
	rm -rf outputs .pytest_cache
