"""`rlaif-ray serve-labeler`: the labeler model behind an OpenAI-compatible /v1/completions
(Ray Serve; actors/labeler_server.py), on 127.0.0.1 unless serve.host says otherwise. Each
replica enforces the `serve.*` request limits (rlaif_ray/feedback/openai_api.py, EndpointLimits)."""
from __future__ import annotations

import hashlib
import os
import sys

from ray import serve

from actors.labeler_server import LabelerEndpoint
from actors.ray_session import start_ray
from rlaif_ray.engines.devices import role_device
from rlaif_ray.feedback.openai_api import EndpointLimits, exposure_warning

# Ray Serve's own per-replica concurrency: the admitted requests (serve.max_queued_requests + 1)
# plus room for /health and for refusals, which are answered at once. Requests beyond wait in
# Ray Serve's router, at most ROUTER_QUEUE of them (beyond that Ray Serve answers 503).
SPARE_ONGOING = 8
ROUTER_QUEUE = 256


def serve_labeler(cfg) -> str:
    """Start Ray Serve with the labeler on cfg.serve.host:port; returns the base URL."""
    s = cfg.serve
    key = os.environ.get(s.api_key_env)
    warning = exposure_warning(s.host, s.port, s.api_key_env, bool(key))
    if warning:
        print(warning, file=sys.stderr, flush=True)
    start_ray(cfg.ray)
    serve.start(http_options={"host": s.host, "port": s.port})
    model_name = cfg.reward.model or cfg.model.name
    app = LabelerEndpoint.options(num_replicas=s.num_replicas,
                                  max_ongoing_requests=s.max_queued_requests + 1 + SPARE_ONGOING,
                                  max_queued_requests=ROUTER_QUEUE,
                                  ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus}).bind(
        model_name, model_name, cfg.model.dtype,
        "vllm" if cfg.reward.backend == "vllm" else "hf", s.torch_threads, EndpointLimits.of(s),
        hashlib.sha256(key.encode()).hexdigest() if key else None, role_device(s.num_gpus),
        cfg.pipeline.labelers.vllm.model_dump())
    serve.run(app, name="labeler", route_prefix="/")
    return f"http://{s.host}:{s.port}/v1"
