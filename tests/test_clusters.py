"""Cluster files: every YAML in clusters/ passes Ray's own cluster-config schema (what
`ray up` checks), and the KubeRay RayJob has the structure the operator needs."""
import copy
import re
from pathlib import Path

import pytest
import yaml

CLUSTERS = Path(__file__).resolve().parents[1] / "clusters"
RAY_UP = sorted(p.name for p in CLUSTERS.glob("*.yaml") if p.name != "kuberay-rayjob.yaml")


@pytest.mark.parametrize("name", RAY_UP)
def test_cluster_yaml_passes_rays_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTERS / name).read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))  # raises on any schema error
    assert raw["head_start_ray_commands"] and any("--dashboard-host=127.0.0.1" in c for c in raw["head_start_ray_commands"])
    # a typo is caught by the same check
    bad = copy.deepcopy(raw)
    bad["idle_timeout_minutez"] = 5
    with pytest.raises(Exception, match="idle_timeout_minutez"):
        validate_config(prepare_config(bad))


ROOT = CLUSTERS.parent
PIN = next(line.split("==")[1].strip() for line in (ROOT / "constraints-cpu.txt").read_text().splitlines()
           if line.startswith("ray=="))
IMAGE = next(line.split("?=")[1].strip() for line in (ROOT / "Makefile").read_text().splitlines()
             if line.startswith("IMAGE ?="))


@pytest.mark.parametrize("name", RAY_UP)
def test_launcher_files_start_ray_in_the_venv_with_token_auth_and_an_idle_head(name):
    raw = yaml.safe_load((CLUSTERS / name).read_text())
    starts = raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
    for cmd in starts:  # `ray stop` and `ray start` from the venv the setup installed into
        assert "~/rlaif-ray/.venv/bin/ray " in cmd and not re.search(r"(^|[;\s])ray (start|stop)", cmd), cmd
    assert all("RAY_AUTH_MODE=token" in c for c in starts if " start " in c)
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # every node installs into its venv under the lock on the shared mount, after mounting it
    setup = raw["setup_commands"]
    install = next(i for i, c in enumerate(setup) if "bash clusters/install-node.sh -e '.[vllm" in c)
    assert any(" /shared" in c and "mount" in c for c in setup[:install])
    assert any("--num-cpus=0" in c for c in raw["head_start_ray_commands"])  # the head runs no RL actors
    if "available_node_types" in raw:
        head = raw["available_node_types"][raw["head_node_type"]]
        assert head["resources"].get("CPU", 0) == 0 and "GPU" not in head["resources"] and head["max_workers"] == 0


def _wheel(tmp: Path, version: str) -> None:
    """A tiny wheel `rlaifdemo-dep` of `version` in tmp/wheels (no index needed to install it)."""
    import subprocess
    import sys

    src = tmp / f"dep-{version}"
    (src / "rlaifdemo_dep").mkdir(parents=True)
    (src / "rlaifdemo_dep" / "__init__.py").write_text(f"VERSION = {version!r}\n")
    (src / "pyproject.toml").write_text(f'[project]\nname = "rlaifdemo-dep"\nversion = "{version}"\n'
                                        '[build-system]\nrequires = ["setuptools"]\n'
                                        'build-backend = "setuptools.build_meta"\n')
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp / "wheels"), str(src)], check=True)


@pytest.mark.slow  # two venvs
def test_install_node_keeps_every_node_on_the_first_nodes_versions(tmp_path):
    """clusters/install-node.sh, as `ray up` runs it on each node: the first node installs the
    newest release and writes its lock; a node started after a new release installs the lock's
    version, not the new one (offline: a local folder of wheels is the index)."""
    import os
    import subprocess

    _wheel(tmp_path, "1.0")
    lock = tmp_path / "shared" / "rlaif-ray-lock.txt"
    lock.parent.mkdir()
    env = {**os.environ, "RLAIF_RAY_LOCK": str(lock), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path / "wheels"),
           "PIP_CONSTRAINT": "", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("VIRTUAL_ENV", None)

    def node(name: str) -> str:
        home = tmp_path / name
        home.mkdir()
        out = subprocess.run(["bash", str(CLUSTERS / "install-node.sh"), "rlaifdemo-dep"], cwd=home, env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return subprocess.run([str(home / ".venv" / "bin" / "python"), "-c",
                               "import rlaifdemo_dep; print(rlaifdemo_dep.VERSION)"],
                              capture_output=True, text=True, check=True).stdout.strip()

    assert node("head") == "1.0"
    assert "rlaifdemo-dep==1.0" in lock.read_text().splitlines()
    _wheel(tmp_path, "2.0")  # released after the head started
    assert node("worker-next-week") == "1.0"
    lock.unlink()  # moving the cluster on: the next node resolves again and writes a new lock
    assert node("worker-after-unlock") == "2.0" and "rlaifdemo-dep==2.0" in lock.read_text().splitlines()


def test_gpu_cluster_worker_types_declare_the_role_resources():
    for name in ("aws-gpu.yaml", "gcp-gpu.yaml"):
        types = yaml.safe_load((CLUSTERS / name).read_text())["available_node_types"]
        assert types["gpu_node"]["resources"] == {"CPU": 96, "GPU": 8, "rollout": 8, "learner": 8}
        assert types["gpu_rollout"]["resources"]["rollout"] == types["gpu_rollout"]["resources"]["GPU"] == 8
        assert types["gpu_learner"]["resources"]["learner"] == types["gpu_learner"]["resources"]["GPU"] == 8


def _meant_for(config: Path) -> list[str]:
    line = next(x for x in config.read_text().splitlines() if x.startswith("# clusters:"))
    return line.split(":", 1)[1].split()


GPU_CONFIGS = sorted((ROOT / "configs" / "gpu").glob("*.yaml"))


@pytest.mark.parametrize("config", GPU_CONFIGS, ids=[c.name for c in GPU_CONFIGS])
def test_every_gpu_config_passes_check_on_every_cluster_it_is_meant_for(config, capsys):
    from rlaif_ray.commands.cli import main

    clusters = _meant_for(config)
    assert clusters and all((CLUSTERS / c).is_file() for c in clusters)
    text = config.read_text()
    assert "Hub ids it expects" in text and "Placement" in text
    for c in clusters:
        assert main(["check", str(config), "--cluster", str(CLUSTERS / c)]) == 0, c
        out = capsys.readouterr().out
        assert "the config is valid" in out and "learner:" in out and "generators:" in out, out
        # every cluster file mounts one shared file system at /shared, where the GPU configs write
        assert "outputs: /shared/rlaif-runs (on /shared, a shared file system every node mounts)" in out, out


@pytest.mark.parametrize("cluster", ["aws-gpu.yaml", "gcp-gpu.yaml", "kuberay-rayjob.yaml"])
def test_check_refuses_outputs_on_a_nodes_own_disk_of_a_multi_node_cluster(cluster, capsys):
    """The driver runs on the head and the actors on workers: a node-local run.out_dir is one
    error line naming the field and the cluster's shared mounts; a URI or a folder under the
    shared mount passes and says where the outputs go."""
    from rlaif_ray.commands.cli import main
    from rlaif_ray.run.cluster_plan import shared_mounts

    assert shared_mounts(CLUSTERS / cluster) == ["/shared"]
    config = str(ROOT / "configs" / "tldr-d-rlaif.yaml")
    for out_dir in ("runs", "/data/runs", "/sharedx/runs"):
        assert main(["check", config, "--cluster", str(CLUSTERS / cluster), "--set", f"run.out_dir={out_dir}"]) == 2
        err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert len(err) == 1 and err[0].startswith(f"error: run.out_dir={out_dir} is on each node's own disk"), err
        assert "this cluster file mounts: /shared" in err[0], err
    for out_dir, where in (("s3://bucket/runs", "shared storage every node reaches"), ("/shared/x", "on /shared")):
        assert main(["check", config, "--cluster", str(CLUSTERS / cluster), "--set", f"run.out_dir={out_dir}"]) == 0
        assert f"outputs: {out_dir} ({where}" in capsys.readouterr().out


def test_check_refuses_a_layout_the_cluster_cannot_hold(capsys):
    from rlaif_ray.commands.cli import main

    big = ROOT / "configs" / "gpu" / "tldr-d-rlaif-64gpu.yaml"
    assert main(["check", str(big), "--cluster", str(CLUSTERS / "kuberay-rayjob.yaml")]) == 2
    err = capsys.readouterr().err
    assert "GPU: the layout needs 64 (generators 32 x 1 + labelers 16 x 1 + learner 16 x 1) but the cluster " \
           "declares 8" in err and "Traceback" not in err


def test_check_refuses_rl_actors_on_the_head(tmp_path, capsys):
    from rlaif_ray.commands.cli import main

    raw = yaml.safe_load((CLUSTERS / "aws-gpu.yaml").read_text())
    raw["available_node_types"]["head"]["resources"] = {"CPU": 8}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = tmp_path / "cpu.yaml"
    cfg.write_text("rl: {prompts_per_step: 2}\npipeline: {generators: {num_cpus: 1}}\n")
    assert main(["check", str(cfg), "--cluster", str(tmp_path / "c.yaml")]) == 2
    assert "fit the head node, which must schedule no RL actors" in capsys.readouterr().err


BAD_CLUSTER_FILES = {
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not UTF-8 text"),
    "latin1": ("available_node_types: {k\u00f6ln: {resources: {CPU: 1}}}\n".encode("latin-1"), "not UTF-8 text"),
    "empty": (b"", "neither a Ray cluster-launcher YAML"),
    "bad_yaml": (b"available_node_types: {gpu: [1, 2}\n", "not valid YAML at line 1"),
    "types_a_list": (b"available_node_types: [gpu_node]\n", "available_node_types must map node type names"),
    "resources_text": (b"available_node_types: {gpu_node: {resources: lots}}\n",
                       "available_node_types.gpu_node is not shaped as Ray expects"),
    "gpu_count_text": (b"available_node_types: {gpu_node: {resources: {GPU: eight}}}\n",
                       "available_node_types.gpu_node is not shaped as Ray expects"),
    "kuberay_no_containers": (b"kind: RayCluster\nspec: {headGroupSpec: {template: {spec: {}}}}\n",
                              "headGroupSpec is not shaped as Ray expects (missing 'containers')"),
    "kuberay_bad_group": (b"kind: RayCluster\nspec:\n  headGroupSpec: {template: {spec: {containers: [{}]}}}\n"
                          b"  workerGroupSpecs: [{replicas: two, groupName: g}]\n",
                          "workerGroupSpecs[0] is not shaped as Ray expects"),
}


@pytest.mark.parametrize("case", sorted(BAD_CLUSTER_FILES))
def test_check_refuses_a_bad_cluster_file_in_one_line(case, tmp_path, capsys):
    """Binary, non-UTF-8, empty, broken or wrongly shaped cluster files: one `error:` line
    naming the file (and the field), never a traceback."""
    from rlaif_ray.commands.cli import main

    content, expected = BAD_CLUSTER_FILES[case]
    bad = tmp_path / f"{case}.yaml"
    bad.write_bytes(content)
    assert main(["check", str(ROOT / "configs" / "quickstart.yaml"), "--cluster", str(bad)]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0], err
    assert expected in lines[0] and "Traceback" not in err, err


def test_kuberay_rayjob_structure():
    claim, job = yaml.safe_load_all((CLUSTERS / "kuberay-rayjob.yaml").read_text())
    # the outputs outlive the cluster: a ReadWriteMany claim every pod mounts at /shared
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].startswith("rlaif-ray train configs/gpu/") and spec["shutdownAfterJobFinishes"] is True
    assert (ROOT / spec["entrypoint"].split()[2]).is_file()  # the config it runs exists
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == PIN  # the image's Ray is the project's pin
    head = cluster["headGroupSpec"]
    # the submitter reaches the dashboard through the in-cluster head Service; the head runs no actors
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0" and head["rayStartParams"]["num-cpus"] == "0"
    assert "headServiceType" not in head and "serviceType" not in str(job)  # no LoadBalancer / NodePort
    containers = [head["template"]["spec"]["containers"][0], spec["submitterPodTemplate"]["spec"]["containers"][0]]
    groups = cluster["workerGroupSpecs"]
    containers += [g["template"]["spec"]["containers"][0] for g in groups]
    for c in containers:  # token auth everywhere, the token from a Kubernetes Secret
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "rlaif-ray-auth", "key": "auth_token"}
        assert "value" not in env["RAY_AUTH_TOKEN"] and c["image"] == IMAGE
    for pod in [head, *groups]:
        spec_ = pod["template"]["spec"]
        assert spec_["volumes"] == [{"name": "shared", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}]
        assert {"name": "shared", "mountPath": "/shared"} in spec_["containers"][0]["volumeMounts"]
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        c = g["template"]["spec"]["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"]
        yaml.safe_load(yaml.safe_load(g["rayStartParams"]["resources"]))  # ray start --resources takes JSON


def test_dockerfile_builds_the_image_the_cluster_files_name():
    text = (ROOT / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={PIN}" in text and "FROM rayproject/ray:${RAY_VERSION}" in text
    assert '"ray[default,train,data,serve]==${RAY_VERSION}"' in text and ".[vllm" in text
    assert IMAGE in text and "image:" in (ROOT / "Makefile").read_text()
