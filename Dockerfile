# The image clusters/kuberay-rayjob.yaml names: Ray at the project's pin (constraints-cpu.txt),
# CUDA, vLLM and rlaif-ray. Build and push: `make image` (docker build -t ghcr.io/rlaif-ray/rlaif-ray:0.1.0 .)
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-cu128
ARG RAY_VERSION
WORKDIR /home/ray/rlaif-ray
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users rlaif_ray rlaif_ray
COPY --chown=ray:users actors actors
COPY --chown=ray:users benchmarks benchmarks
COPY --chown=ray:users configs configs
# vLLM brings its CUDA build of torch (the wandb and mlflow extras: run.trackers); Ray stays at the version the image and the cluster run
RUN pip install --no-cache-dir -e ".[vllm,tensorboard,wandb,mlflow]" "ray[default,train,data,serve]==${RAY_VERSION}"
ENV TOKENIZERS_PARALLELISM=false
