"""`ray job submit` end to end: a head started here on 127.0.0.1 (token auth, as Ray 2.60
defaults), a short `train` submitted with --working-dir, SUCCEEDED, its logs read back, and
the head stopped by its own pid (`ray start --block` cleans up its processes on SIGTERM)."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_job_submit_runs_train(tiny_model_path, tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "token", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}  # the job runs `rlaif-ray`
    env.pop("RAY_ADDRESS", None)
    ports = {k: _free_port() for k in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                       "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
                                       "ray-client-server-port")}
    temp = Path("/tmp") / f"rj{os.getpid()}"  # short: Ray's unix socket paths have a length limit
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--num-cpus=2", "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1",
         "--include-dashboard=true", f"--temp-dir={temp}", *[f"--{k}={v}" for k, v in ports.items()]],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    job = f"rjtest-{os.getpid()}"
    try:
        deadline = time.time() + 180
        cmd = [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--submission-id", job,
               "--no-wait", "--", "rlaif-ray", "train", "configs/quickstart.yaml", f"--set=model.name={tiny_model_path}",
               "--set=rl.steps=1", "--set=rl.prompts_per_step=2", "--set=generation.max_new_tokens=4",
               "--set=eval.num_prompts=2", "--set=eval.signal_posts=0", "--set=reward.min_label_mass=0",
               f"--set=run.out_dir={tmp_path}", "--set=run.name=job", "--set=pipeline.learner.num_cpus=0.5",
               "--set=pipeline.learner.torch_threads=1", "--set=run.progress=false"]
        while True:  # the head's job agent registers a few seconds after `ray start` returns
            sub = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
            if sub.returncode == 0:
                break
            if time.time() > deadline or head.poll() is not None:
                pytest.fail(f"job submit failed: {sub.stdout[-2000:]}{sub.stderr[-2000:]}")
            time.sleep(3)
        status = ""
        deadline = time.time() + 600
        while time.time() < deadline:
            out = subprocess.run([RAY, "job", "status", "--address", address, job], env=env,
                                 capture_output=True, text=True, timeout=60)
            status = (out.stdout + out.stderr).lower()  # "Job '...' succeeded" / failed / stopped
            if any(f"' {s}" in status for s in ("succeeded", "failed", "stopped")):
                break
            time.sleep(3)
        logs = subprocess.run([RAY, "job", "logs", "--address", address, job], env=env, capture_output=True,
                              text=True, timeout=60).stdout
        assert f"job '{job}' succeeded" in status, f"{status}\n{logs[-3000:]}"
        assert "step   1/1" in logs and "run folder:" in logs  # the driver's own lines, read back from the job
        runs = list(tmp_path.glob("job-*"))
        assert len(runs) == 1 and (runs[0] / "summary.json").is_file() and (runs[0] / "checkpoints" / "latest").is_file()
        # the dashboard (and its job API) answers on loopback only, not on the machine's own address
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            own_ip = s.getsockname()[0]
        if not own_ip.startswith("127."):
            with pytest.raises(OSError):
                urllib.request.urlopen(f"http://{own_ip}:{ports['dashboard-port']}", timeout=3)
    finally:
        head.send_signal(signal.SIGTERM)  # its own pid: `ray start --block` stops what it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
    time.sleep(2)
    left = subprocess.run(["pgrep", "-f", str(temp)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes of the test head still running: {left}"
