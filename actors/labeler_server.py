"""LabelerEndpoint: the project's labeler model behind an OpenAI-compatible
/v1/completions (with `logprobs`), served by Ray Serve on 127.0.0.1 by default.

The request checks and the answer's shape live in rlaif_ray/openai_api.py; this file is the
Ray Serve shell. If serve.api_key_env names a set variable when the server starts, requests
must carry that key as a Bearer token; only its SHA-256 reaches the replicas, never the key.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import threading

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from rlaif_ray.openai_api import RequestError, completion_response, parse_request

api = FastAPI(title="rlaif-ray labeler", docs_url=None, redoc_url=None)


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind}})


@serve.deployment
@serve.ingress(api)
class LabelerEndpoint:
    def __init__(self, served_name: str, model_name: str, dtype: str, backend: str, torch_threads: int,
                 max_tokens_limit: int, key_sha256: str | None, device: str = "cpu", vllm: dict | None = None):
        import torch

        from rlaif_ray.engines import load_engine
        from rlaif_ray.models import model_context

        torch.set_num_threads(torch_threads)
        self.served_name, self.key_sha256, self.max_tokens_limit = served_name, key_sha256, max_tokens_limit
        self.context = model_context(model_name)
        # the completions endpoint reports the model's own log-probs (vLLM: raw, not processed)
        self.engine = load_engine(backend, model_name, device, dtype, vllm=vllm,
                                  **(dict(logprobs_mode="raw_logprobs") if backend == "vllm" else {}))
        self.tok = self.engine.tok  # the engine's own, not a second load
        self.lock = threading.Lock()  # one forward pass at a time per replica
        self.served = 0

    def _authorized(self, request: Request) -> bool:
        if not self.key_sha256:
            return True
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(hashlib.sha256(given.encode()).hexdigest(), self.key_sha256)

    @api.get("/health")
    def health(self) -> dict:
        return {"status": "ok", "pid": os.getpid(), "served": self.served}

    @api.get("/v1/models")
    def models(self, request: Request):
        if not self._authorized(request):
            return _error(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error")
        return {"object": "list", "data": [{"id": self.served_name, "object": "model", "owned_by": "rlaif-ray"}]}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        if not self._authorized(request):
            return _error(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the request body is not JSON")
        model = body.get("model") if isinstance(body, dict) else None
        if model not in (None, self.served_name):
            return _error(404, f"model {model!r} is not served here; this endpoint serves {self.served_name!r}",
                          "not_found_error")
        try:
            req = parse_request(body, self.max_tokens_limit)
            return await asyncio.to_thread(self._complete, req)
        except RequestError as e:
            return _error(400, str(e))

    def _complete(self, req: dict) -> dict:
        seqs = [self.tok(p, add_special_tokens=False)["input_ids"] for p in req["prompts"]]
        for i, s in enumerate(seqs):
            if len(s) + req["max_tokens"] > self.context:
                raise RequestError(f"prompt {i} has {len(s)} tokens; with max_tokens={req['max_tokens']} it "
                                   f"exceeds the model's context of {self.context}")
        k = req["logprobs"] or 0
        with self.lock:
            raw = self.engine.sample_with_logprobs(seqs, req["max_tokens"], req["temperature"], req["top_p"],
                                                   req["top_k"], k, req["seed"] or 0)
            self.served += len(seqs)
        results = []
        for r in raw:
            tokens = [self.tok.decode([t]) for t in r["ids"]]
            top = [{self.tok.decode([t]): lp for t, lp in step} for step in r["top"]] if r["top"] else None
            results.append({"text": self.tok.decode(r["ids"], skip_special_tokens=True), "tokens": tokens,
                            "token_logprobs": r["token_logprobs"], "top_logprobs": top,
                            "finish_reason": r["finish_reason"]})
        return completion_response(self.served_name, results, req["logprobs"] is not None, sum(map(len, seqs)))


def serve_labeler(cfg) -> str:
    """Start Ray Serve with the labeler on cfg.serve.host:port; returns the base URL."""
    from rlaif_ray.devices import role_device
    from rlaif_ray.driver import start_ray

    start_ray(cfg)
    s = cfg.serve
    key = os.environ.get(s.api_key_env)
    serve.start(http_options={"host": s.host, "port": s.port})
    model_name = cfg.reward.model or cfg.model.name
    app = LabelerEndpoint.options(num_replicas=s.num_replicas,
                                  ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus}).bind(
        model_name, model_name, cfg.model.dtype,
        "vllm" if cfg.reward.backend == "vllm" else "hf", s.torch_threads, s.max_tokens_limit,
        hashlib.sha256(key.encode()).hexdigest() if key else None, role_device(s.num_gpus),
        cfg.pipeline.labelers.vllm.model_dump())
    serve.run(app, name="labeler", route_prefix="/")
    return f"http://{s.host}:{s.port}/v1"
