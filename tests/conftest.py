import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def _pin_xdist_worker() -> None:
    """Under pytest-xdist (`make test` runs -n 2), each worker and all it starts (its own local
    Ray, the actors, vLLM's engine process) computes on its own share of the cores. Unpinned,
    two workers' runs each size their torch threads for every core (torch_threads: auto), so
    twice the threads compute at once and OpenMP's barriers wait on threads the other run has
    descheduled. Pinned, `auto` sees the worker's share (rlaif_ray.cpu.threads.machine_cores)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2 or not hasattr(os, "sched_setaffinity") \
            or os.environ.get("RLAIF_TEST_PIN", "1") == "0":
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= count:
        os.sched_setaffinity(0, cores[int(worker[2:]) % count::count])


_pin_xdist_worker()


@pytest.fixture(scope="session")
def tokenizer():
    from rlaif_ray.engines.models import DEFAULT_MODEL, load_tokenizer

    return load_tokenizer(DEFAULT_MODEL)  # converts the embedded GGUF once (cached)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory, tokenizer):
    """A randomly initialised 2-layer Llama on the real SmolLM2 tokenizer."""
    from rlaif_ray.engines.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path):
    from rlaif_ray.engines.models import load_model

    return load_model(tiny_model_path)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the session: 2 CPUs, no dashboard."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(items):
    """A test that starts the session's Ray runs real actors (seconds to a minute each): it is
    `slow`, so `make test-fast` (-m "not slow") skips it without a mark by hand."""
    for item in items:
        if "ray_local" in item.fixturenames:
            item.add_marker(pytest.mark.slow)


BUCKET = "rlaif-runs"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 server on 127.0.0.1 with one bucket; the AWS_* variables every client reads point
    at it (a child process inherits them: the CLI, the Ray it starts, its actors), and each
    node's copies of URI folders go to a fresh staging folder (RLAIF_RAY_STAGING)."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    pytest.importorskip("moto")
    import pyarrow.fs as pafs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": url, "RLAIF_RAY_STAGING": str(tmp_path_factory.mktemp("staging"))}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    pafs.S3FileSystem(endpoint_override=url, allow_bucket_creation=True).create_dir(BUCKET)
    yield f"s3://{BUCKET}"
    proc.terminate()
    proc.wait()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
