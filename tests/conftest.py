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


def _s3_env() -> dict:
    """The test session's S3 endpoint (the `s3` fixture starts the server there when a test
    needs it), fake credentials and a staging folder for URI folders, in the environment from
    the start: a local Ray started later (ray_local) hands them to its actors, as a cluster's
    nodes would have their own. Never a real AWS account."""
    import socket
    import tempfile

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "RLAIF_RAY_STAGING": tempfile.mkdtemp(prefix="rlaif-staging-")}


os.environ.update(_s3_env())


@pytest.fixture(scope="session")
def s3():
    """An S3 server (moto's server mode, its own process) on the session's loopback endpoint
    with one bucket; every client here, in a child process (the CLI, the Ray it starts) or in
    a local Ray's actors reads it from AWS_ENDPOINT_URL. Tests use their own prefixes."""
    import subprocess
    import sys
    import time
    import urllib.request

    pytest.importorskip("moto")
    import pyarrow.fs as pafs

    url = os.environ["AWS_ENDPOINT_URL"]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", url.rsplit(":", 1)[1]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    pafs.S3FileSystem(endpoint_override=url, allow_bucket_creation=True).create_dir(BUCKET)
    yield f"s3://{BUCKET}"
    proc.terminate()
    proc.wait()
