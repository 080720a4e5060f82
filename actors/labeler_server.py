"""LabelerEndpoint: the project's labeler model behind an OpenAI-compatible /v1/completions
and /v1/chat/completions (with log-probs, and `n` answers a prompt), served by Ray Serve on
127.0.0.1 by default.

The request checks, the limits and the answer's shape live in rlaif_ray/feedback/openai_api.py; this
file is the Ray Serve shell. If serve.api_key_env names a set variable when the server starts,
requests must carry that key as a Bearer token; only its SHA-256 reaches the replicas, never
the key.

How one replica stays bounded (the limits are `serve.*` keys, see EndpointLimits):
- a request is refused from its headers (415 not JSON, 413 a declared body over the cap)
  before its body is read; the body is read chunk by chunk and refused (413) as soon as the
  bytes read pass the cap, then parsed and tokenized in one thread, one body at a time;
- at most serve.max_queued_requests + 1 requests are admitted at once (one generating, the
  rest waiting for it); beyond, 429 with Retry-After, answered without reading the body;
- one request generates at a time (`gate`, an asyncio lock, on one engine thread);
- the time limit: every request has a deadline, arrival + serve.request_timeout_s. Waiting for
  the gate past it answers 504. The generating request's engine asks `should_stop` (deadline
  passed, or the client went away) before each batch of prompts and after each decoding step,
  and stops there (TimeoutError -> 504). The gate is released only when the engine thread has
  returned, so the next request never overlaps it: a replica is held by one request for at
  most the time limit plus one forward pass (one batch's prefill or one decoding step; with
  vLLM, one batch of serve.batch_size prompts, which it cannot stop inside).
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from rlaif_ray.engines.backends import load_engine
from rlaif_ray.engines.models import model_context
from rlaif_ray.feedback.openai_api import (
    EndpointLimits,
    RequestError,
    chat_response,
    check_body_size,
    check_headers,
    check_tokens,
    completion_response,
    parse_chat_request,
    parse_request,
    queue_full,
    time_limit,
)

from .process import ActorProcess

api = FastAPI(title="rlaif-ray labeler", docs_url=None, redoc_url=None)

UNAUTHORIZED = ("missing or wrong API key (Authorization: Bearer ...)", 401, "invalid_api_key", "authentication_error")


@serve.deployment
@serve.ingress(api)
class LabelerEndpoint:
    def __init__(self, served_name: str, model_name: str, dtype: str, backend: str, torch_threads: int,
                 limits: EndpointLimits, key_sha256: str | None, device: str = "cpu", vllm: dict | None = None):
        # threads and (CPU) attention as every actor of the project sets them up; generation
        # time is the endpoint's own (limits, timeouts), not an actor's busy clock
        self.proc = ActorProcess("endpoint", served_name, torch_threads, device)
        self.served_name, self.key_sha256, self.limits = served_name, key_sha256, limits
        self.context = model_context(model_name)
        # the completions endpoint reports the model's own log-probs (vLLM: raw, not processed)
        self.engine = load_engine(backend, model_name, device, dtype, vllm=vllm,
                                  **(dict(logprobs_mode="raw_logprobs") if backend == "vllm" else {}))
        if backend == "hf":
            self.proc.tune(self.engine.model)
        self.tok = self.engine.tok  # the engine's own, not a second load
        self.gate = asyncio.Lock()  # one generating request at a time per replica
        self.engine_thread = ThreadPoolExecutor(1, thread_name_prefix="labeler-generate")
        self.prepare_thread = ThreadPoolExecutor(1, thread_name_prefix="labeler-prepare")  # JSON + tokens
        self.in_flight = 0  # admitted, not yet answered: generating + waiting
        self.running = 0
        self.mean_run_s: float | None = None  # how long a request holds the gate (Retry-After)
        self.served = 0
        self.refused: dict[str, int] = {}  # by HTTP status

    def _authorized(self, request: Request) -> bool:
        if not self.key_sha256:
            return True
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(hashlib.sha256(given.encode()).hexdigest(), self.key_sha256)

    def _refuse(self, e: RequestError) -> JSONResponse:
        self.refused[str(e.status)] = self.refused.get(str(e.status), 0) + 1
        return JSONResponse(status_code=e.status, content=e.body(), headers=e.headers)

    @api.get("/health")
    def health(self) -> dict:
        return {"status": "ok", "pid": os.getpid(), "served": self.served, "in_flight": self.in_flight,
                "running": self.running, "refused": dict(self.refused)}

    @api.get("/v1/models")
    def models(self, request: Request):
        if not self._authorized(request):
            return self._refuse(RequestError(*UNAUTHORIZED))
        return {"object": "list", "data": [{"id": self.served_name, "object": "model", "owned_by": "rlaif-ray"}]}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve(request, chat=True)

    async def _serve(self, request: Request, chat: bool):
        deadline = time.monotonic() + self.limits.timeout_s
        if not self._authorized(request):
            return self._refuse(RequestError(*UNAUTHORIZED))
        try:  # from the headers alone, before the body is read
            check_headers(request.headers.get("content-type"), request.headers.get("content-length"), self.limits)
            if self.in_flight >= self.limits.max_queued + 1:
                raise queue_full(self.in_flight - self.running, self.mean_run_s, self.limits)
        except RequestError as e:
            return self._refuse(e)
        self.in_flight += 1
        try:
            return await self._admitted(request, deadline, chat)
        except RequestError as e:
            return self._refuse(e)
        finally:
            self.in_flight -= 1

    async def _admitted(self, request: Request, deadline: float, chat: bool) -> dict:
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            check_body_size(len(raw), self.limits)
        loop = asyncio.get_running_loop()
        req, seqs = await loop.run_in_executor(self.prepare_thread, self._prepare, bytes(raw), chat)
        try:
            await asyncio.wait_for(self.gate.acquire(), max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            raise time_limit(self.limits, "it was still waiting for the replica") from None
        cancel = threading.Event()
        started = time.monotonic()
        self.running += 1
        job = loop.run_in_executor(self.engine_thread, self._complete, req, seqs,
                                   lambda: cancel.is_set() or time.monotonic() >= deadline, chat)

        def release(f):  # only when the engine thread has returned: the next request never overlaps it
            self.running -= 1
            self.gate.release()
            took = time.monotonic() - started
            self.mean_run_s = took if self.mean_run_s is None else 0.8 * self.mean_run_s + 0.2 * took
            if not f.cancelled():
                f.exception()  # retrieved here when the client has gone

        job.add_done_callback(release)
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:  # the client went away: stop at the next decoding step
            cancel.set()
            raise
        except TimeoutError:
            raise time_limit(self.limits, "generation was stopped at the limit") from None

    def _prepare(self, raw: bytes, chat: bool = False) -> tuple[dict, list[list[int]]]:
        """The body parsed and checked, the prompts tokenized and counted (stopping at the first
        prompt over a limit); a chat request's messages in the model's chat template. One body
        at a time (prepare_thread): bounded memory."""
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise RequestError("the request body is not JSON") from None
        model = body.get("model") if isinstance(body, dict) else None
        if model not in (None, self.served_name):
            raise RequestError(f"model {model!r} is not served here; this endpoint serves {self.served_name!r}",
                               404, "model_not_found", "not_found_error", "model")
        req = parse_chat_request(body, self.limits) if chat else parse_request(body, self.limits)
        prompts = [self.tok.apply_chat_template(req["messages"], tokenize=False, add_generation_prompt=True)] if chat \
            else req["prompts"]
        seqs: list[list[int]] = []
        for p in prompts:  # `n` answers a prompt: its sequence repeated (the samples differ: one seed, many rows)
            seqs += [self.tok(p, add_special_tokens=False)["input_ids"]] * req["n"]
            check_tokens([len(s) for s in seqs], req["max_tokens"], self.limits, self.context)
        return req, seqs

    def _complete(self, req: dict, seqs: list[list[int]], should_stop, chat: bool = False) -> dict:
        k = req["logprobs"] or 0
        raw = self.engine.sample_with_logprobs(seqs, req["max_tokens"], req["temperature"], req["top_p"],
                                               req["top_k"], k, req["seed"] or 0, batch_size=self.limits.batch_size,
                                               should_stop=should_stop)
        self.served += len(seqs)
        results = []
        for r in raw:
            tokens = [self.tok.decode([t]) for t in r["ids"]]
            top = [{self.tok.decode([t]): lp for t, lp in step} for step in r["top"]] if r["top"] else None
            results.append({"text": self.tok.decode(r["ids"], skip_special_tokens=True), "tokens": tokens,
                            "token_logprobs": r["token_logprobs"], "top_logprobs": top,
                            "finish_reason": r["finish_reason"]})
        answer = chat_response if chat else completion_response
        return answer(self.served_name, results, req["logprobs"] is not None, sum(map(len, seqs[::req["n"]])))
