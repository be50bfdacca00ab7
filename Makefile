# The two commands a user needs: `make demo` (quickstart) and `make test` (the whole suite).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast lint demo recipe-public recipe-public-quick clean image-base image image-smoke

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned, so nothing later pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,mining]'
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check gemb_dist jobs bench tests
	$(VENV)/bin/ruff format --check gemb_dist jobs bench tests

test: $(STAMP) lint
	$(PY) -m pytest -q -ra --durations=25

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow"

demo: $(STAMP)
	bash cluster/local/demo.sh

# The public-data recipe (recipes/public/run.py) on the local Ray head and MLflow server; PUBLIC_DATA is the folder
# of public training splits (SciFact, STS Benchmark, MRPC, Banking77).
PUBLIC_DATA ?= ../shared/data/public
recipe-public recipe-public-quick: $(STAMP)
	VENV=$(VENV) bash cluster/local/start.sh
	. $${GEMB_LOCAL_DIR:-runs/local}/env.sh && $(PY) recipes/public/run.py --data $(PUBLIC_DATA) \
		$(if $(filter recipe-public-quick,$@),--quick)

# The container image, built with podman, no daemon (cluster/image/image.py; README "Building the image").
# `make image-base image image-smoke`: a Debian bookworm base from Debian packages, the CPU image on it, the smoke
# inside it with no network. `make image IMAGE_VARIANT=gpu` builds the GPU image on the Dockerfile's CUDA base.
IMAGE_VARIANT ?= cpu
IMAGE_BASE ?= $(if $(filter cpu,$(IMAGE_VARIANT)),localhost/gemb-base:bookworm)
# Default tag: gemb-dist:<pyproject version>-cpu, or -<the Dockerfile's TORCH_CUDA> for the GPU image.
IMAGE_TAG ?=
IMAGE_PY := python3 cluster/image/image.py

image-base:
	$(IMAGE_PY) base

image:
	$(IMAGE_PY) build --variant $(IMAGE_VARIANT) $(if $(IMAGE_BASE),--base $(IMAGE_BASE)) $(if $(IMAGE_TAG),--tag $(IMAGE_TAG))

image-smoke:
	$(IMAGE_PY) smoke $(if $(IMAGE_TAG),--tag $(IMAGE_TAG))

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
