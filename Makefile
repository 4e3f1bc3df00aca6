# Two commands on a fresh machine:  make run  |  make test
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# llama-cpp-python is built from source. OUTPOST_CUDA=auto builds with CUDA only when
# `nvidia-smi` answers (a GPU is really there; nvcc alone is not enough), 1 forces a
# CUDA build, 0 forbids it.
OUTPOST_CUDA ?= auto
LLAMA_CPP_VERSION ?= 0.3.36
# The CPU build is native (-march=native) but never uses AMX: on a VM whose CPU reports
# AMX without the hypervisor enabling its tiles, llama.cpp's AMX matmul dies with SIGILL
# on the first prompt of a Q4/Q8 model (seen on a Xeon guest here). The x86 GCC flags
# are ignored elsewhere: only x86 compilers know them, so they are added on x86 only.
NO_AMX := $(if $(filter x86_64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
LLAMA_CPU_BUILD := cpu-noamx
# xgrammar needs torch; without this pin pip would pull the newest CUDA build (GBs).
TORCH_SPEC ?= torch==2.13.0
# BFCL's data and AST checker, for the benchmark harness and its test. Installed
# without its dependencies: it would pull dozens of model-client SDKs and pin numpy.
BFCL_SPEC ?= bfcl-eval==2026.3.23
PYTEST_ARGS ?=

.PHONY: run test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	@cuda="$(OUTPOST_CUDA)"; \
	if [ "$$cuda" = auto ]; then if nvidia-smi -L >/dev/null 2>&1; then cuda=1; else cuda=0; fi; fi; \
	if [ "$$cuda" = 1 ]; then want=cuda; else want=$(LLAMA_CPU_BUILD); fi; \
	have="$$(cat $(VENV)/.llama-backend 2>/dev/null)"; \
	if [ "$$want-$(LLAMA_CPP_VERSION)" != "$$have" ]; then \
	  echo "building llama-cpp-python $(LLAMA_CPP_VERSION) for $$want (about 9 minutes on 2 cores, once per venv)"; \
	  if [ "$$want" = cuda ]; then \
	    CMAKE_ARGS="-DGGML_CUDA=on" $(PY) -m pip install -q --no-cache-dir --force-reinstall --no-deps "llama-cpp-python==$(LLAMA_CPP_VERSION)" || exit 1; \
	  else \
	    CMAKE_ARGS="-DGGML_CUDA=off -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'" \
	      $(PY) -m pip install -q --no-cache-dir --force-reinstall --no-deps "llama-cpp-python==$(LLAMA_CPP_VERSION)" || exit 1; \
	  fi; \
	  echo "$$want-$(LLAMA_CPP_VERSION)" > $(VENV)/.llama-backend; \
	fi
	$(PY) -m pip install -q -e '.[dev,curate,fleet,train,http,onnx,convert]'
	$(PY) -m pip install -q --no-deps "$(BFCL_SPEC)"
	@touch $@

run: install
	$(VENV)/bin/outpost models pull
	$(VENV)/bin/outpost serve

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache *.egg-info
