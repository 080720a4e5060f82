"""`rlaif-ray export`: a run folder's checkpoint as a Hugging Face model folder that
transformers loads with the checkpoint's weights (and logits), without the value head, tied
embeddings saved once; a model card with the verdict, the measures and the config; a DCP-only
(FSDP) checkpoint and a LoRA adapter merged the same way; every bad input one error line; the
push through the Hub's HTTP API (a loopback server standing in for the Hub). No Ray."""
import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from test_crash_safety import STATE, _cfg
from test_learner import _batch

VERDICT = {"hacking": True, "reason": "training reward rose (+0.2000) while independent measures got worse: "
           "ROUGE-L F1 vs reference fell", "worse": ["rougeL"], "better": []}
FINAL = {"step": 4, "win_rate": 0.625, "ci95": [0.41, 0.80], "n": 16, "wins": 10, "losses": 6,
         "length_controlled": 0.55, "reward_change": {"mean": 0.2, "ci95_halfwidth": 0.05},
         "independent": {"rougeL": {"before": 0.30, "after": 0.21, "change": -0.09, "ci95_halfwidth": 0.03}},
         "hacking": VERDICT}


@pytest.fixture(scope="module")
def learner(tiny_model_path):
    from rlaif_ray.rl.learner import PolicyLearner

    return PolicyLearner(tiny_model_path, dict(lr=1e-2, samples_per_prompt=2, seed=3, baseline="value"), 0.9)


@pytest.fixture(scope="module")
def run_dir(tiny_model_path, tmp_path_factory, learner):
    """A finished run: checkpoints at steps 2 and 4 (each after a learner step, so the
    weights are not the base model's), a held-out evaluation at step 2, summary.json."""
    from rlaif_ray.run.folder import RunFolder

    tmp = tmp_path_factory.mktemp("export")
    run = RunFolder(_cfg(tiny_model_path, tmp, rl={"steps": 4}), tmp / "run")
    for step in (2, 4):
        learner.step(_batch().to_pylist(), 10, 4)
        learner.save(run.checkpoint_dir(step), {**STATE, "step": step, "policy_version": step})
        run.mark_checkpoint(step)
    run.log_winrate({**FINAL, "step": 2, "win_rate": 0.5, "hacking": {"hacking": False, "reason": "did not rise"}})
    run.write_json("summary.json", {"win_rate": FINAL, "hacking": VERDICT, "independent": FINAL["independent"],
                                    "heldout_change": FINAL["reward_change"], "heldout_before": {"reward_mean": 0.1},
                                    "heldout_after": {"reward_mean": 0.3}})
    return run.path


def _logits(model_dir) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval()
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 200, 17, 3]])).logits


def _same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_export_loads_with_the_checkpoints_weights_and_a_model_card(run_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlaif_ray.commands.cli import main

    out = tmp_path / "hf"
    assert main(["export", str(run_dir), "--to", str(out)]) == 0
    ck = run_dir / "checkpoints" / "step_000004"
    saved = load_file(str(out / "model.safetensors"))
    assert not any("value_head" in k for k in saved) and "lm_head.weight" not in saved  # tied: saved once
    _same_weights(saved, load_file(str(ck / "model.safetensors")))
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(_logits(out), _logits(ck))
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("hello world").input_ids == AutoTokenizer.from_pretrained(ck)("hello world").input_ids
    assert (out / "generation_config.json").is_file() and not list(tmp_path.glob(".hf*"))  # no temp folder left

    card = (out / "README.md").read_text()
    assert "REWARD HACKING SUSPECTED" in card and VERDICT["reason"] in card
    assert card.index("REWARD HACKING SUSPECTED") < card.index("## Measures") < card.index("config.yaml")
    assert "62.5% (Wilson 95% CI 41.0%-80.0%, n=16" in card and "0.300 -> 0.210" in card
    assert "| +0.1000 -> +0.3000 (+0.2000 +- 0.0500) |" in card
    assert (run_dir / "config.yaml").read_text().strip() in card and "<details>" in card
    assert "- rlaif-ray" in card and "- rlaif" in card and "base_model" not in card  # a local base: no hub id
    prov = json.loads((out / "rlaif_ray_run.json").read_text())
    assert prov["step"] == 4 and prov["summary"]["hacking"] == VERDICT and prov["weights_from"] == "full weights"


def test_an_earlier_checkpoint_with_its_own_measures_sharded_and_in_bfloat16(run_dir, tmp_path):
    from safetensors.torch import load_file

    from rlaif_ray.run.export import export_policy

    out = export_policy(run_dir, tmp_path / "hf", "step-2", dtype="bfloat16", max_shard_size="2MB", log=print)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (out / "model.safetensors").exists()
    saved = {k: v for f in files for k, v in load_file(str(out / f)).items()}
    want = load_file(str(run_dir / "checkpoints" / "step_000002" / "model.safetensors"))
    _same_weights(saved, {k: v.to(torch.bfloat16) for k, v in want.items()})
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    card = (out / "README.md").read_text()
    assert "No sign of reward hacking" in card and "winrate.jsonl (the held-out evaluation at step 2)" in card


def test_card_metadata_names_a_hub_base_model(run_dir):
    from rlaif_ray.run.export import model_card, run_records

    records = {**run_records(run_dir), "base_model": "smollm2-135m-instruct", "summary": {}, "winrate": []}
    card = model_card("s3://b/runs/x", 3, records, [])
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and "rlaif" in card.data.tags
    assert "Reward hacking: not checked" in card.text


def test_a_sharded_dcp_checkpoint_exports_the_policy(run_dir, learner, tmp_path, tiny_model_path):
    """An FSDP run's intermediate checkpoint holds only DCP shards (no config, no HF weights):
    the policy is read from them, config and tokenizer from the base model."""
    import shutil

    from rlaif_ray.run.export import export_policy

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    ck = run / "checkpoints" / "step_000006"
    learner._save_sharded(ck, {**STATE, "step": 6, "policy_version": 6}, hf_weights=False)  # one rank's DCP
    (run / "checkpoints" / "latest").write_text("step_000006\n")
    assert (ck / "dcp" / ".metadata").is_file() and not (ck / "config.json").exists()
    out = export_policy(run, tmp_path / "hf")
    from safetensors.torch import load_file

    want = {k: v.detach() for k, v in learner.policy.model.state_dict().items() if k != "lm_head.weight"}
    _same_weights(load_file(str(out / "model.safetensors")), want)
    assert json.loads((out / "rlaif_ray_run.json").read_text())["weights_from"] == "DCP shards"
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2


def test_a_lora_adapter_is_merged(run_dir, tmp_path, tiny_model_path):
    """A LoRA checkpoint (adapter/ with a PEFT adapter of the run's base model): the export is
    the merged model, whose logits are the PeftModel's."""
    import shutil

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    from rlaif_ray.engines.models import load_model
    from rlaif_ray.run.export import export_policy

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("step_*"))
    torch.manual_seed(0)
    peft = get_peft_model(load_model(tiny_model_path), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights=False)).eval()
    ck = run / "checkpoints" / "step_000002"
    peft.save_pretrained(ck / "adapter")
    save_file({}, str(ck / "optimizer.safetensors"))
    (ck / "trainer_state.json").write_text(json.dumps({**STATE, "step": 2, "optimizer_meta": {}}))
    (run / "checkpoints" / "latest").write_text("step_000002\n")
    out = export_policy(run, tmp_path / "hf")
    with torch.no_grad():
        want = peft(torch.tensor([[1, 5, 9, 200, 17, 3]])).logits
    assert torch.allclose(_logits(out), want, atol=1e-5)
    assert not torch.allclose(_logits(tiny_model_path), want, atol=1e-3)  # the adapter changed something
    assert json.loads((out / "rlaif_ray_run.json").read_text())["weights_from"] == "adapter merged into the base model"


@pytest.mark.parametrize("case", ["not_empty", "no_checkpoint", "bad_name", "no_such_step", "no_run", "offline_push",
                                  "bad_repo"])
def test_bad_input_is_one_error_line(case, run_dir, tmp_path, capsys, monkeypatch):
    import shutil

    from rlaif_ray.commands.cli import main

    out, run = tmp_path / "hf", run_dir
    args = ["--checkpoint", "latest"]
    if case == "not_empty":
        out.mkdir()
        (out / "old.txt").write_text("x")
    elif case == "no_checkpoint":
        run = tmp_path / "run"
        shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("step_*", "latest"))
    elif case == "no_run":
        run = tmp_path / "nowhere"
    args = {"bad_name": ["--checkpoint", "final"], "no_such_step": ["--checkpoint", "step-3"],
            "offline_push": ["--push", "me/policy"], "bad_repo": ["--push", "me/bad..name"]}.get(case, args)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert main(["export", str(run), "--to", str(out), *args]) == 2
    err = capsys.readouterr().err
    expect = {"not_empty": f"export: output {out} exists and is not empty", "no_run": "no such run folder",
              "no_checkpoint": f"export {run}: no checkpoint in that run folder",
              "bad_name": "export --checkpoint final: unknown checkpoint; give latest or step-N",
              "no_such_step": "export --checkpoint step-3: no such checkpoint in", "bad_repo": "not a Hub repo id",
              "offline_push": "export --push me/policy: HF_HUB_OFFLINE is set"}[case]
    assert err.count("\n") == 1 and err.startswith("error: ") and expect in err, err
    assert not (out.exists() and case != "not_empty")
    if case == "no_such_step":
        assert "there: latest, step-2, step-4" in err
    if case == "not_empty":  # --overwrite moves the old folder aside, then exports
        assert main(["export", str(run), "--to", str(out), "--overwrite"]) == 0
        assert (out / "config.json").is_file() and len(list(tmp_path.glob("hf.replaced-*/old.txt"))) == 1


class _FakeHub(BaseHTTPRequestHandler):
    """The Hub's three calls of create_repo + upload_folder (files small enough to go inline)."""
    calls: list = []

    def log_message(self, *a):
        pass

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.calls.append((self.path, self.headers.get("Authorization"), body))
        if self.path == "/api/repos/create":
            req = json.loads(body)
            return self._reply({"url": f"http://{self.headers['Host']}/{req['organization']}/{req['name']}"})
        if "/preupload/" in self.path:
            return self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                          for f in json.loads(body)["files"]]})
        return self._reply({"commitUrl": f"http://{self.headers['Host']}/me/policy/commit/abc", "commitOid": "a" * 40})


def test_push_uploads_the_exported_folder(run_dir, tmp_path, monkeypatch, capsys):
    from rlaif_ray.commands.cli import main

    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    try:
        assert main(["export", str(run_dir), "--to", str(tmp_path / "hf"), "--push", "me/policy", "--private"]) == 0
    finally:
        server.shutdown()
    paths = [c[0] for c in _FakeHub.calls]
    assert paths[0] == "/api/repos/create" and json.loads(_FakeHub.calls[0][2])["visibility"] == "private"
    assert any("/api/models/me/policy/preupload/main" in p for p in paths)
    commit = next(c for c in _FakeHub.calls if "/commit/main" in c[0])
    assert commit[1] == "Bearer hf_secret_token_value"
    lines = [json.loads(line) for line in commit[2].decode().splitlines()]
    sent = {v["value"]["path"]: base64.b64decode(v["value"]["content"]) for v in lines if v["key"] == "file"}
    assert sent.keys() == {p.name for p in (tmp_path / "hf").iterdir()}
    assert sent["README.md"] == (tmp_path / "hf" / "README.md").read_bytes()
    assert 'AutoModelForCausalLM.from_pretrained("me/policy")' in sent["README.md"].decode()
    assert "hf_secret_token_value" not in "".join(capsys.readouterr())
    assert Path(tmp_path / "hf" / "model.safetensors").is_file()


@pytest.mark.slow  # an S3 server
def test_a_run_on_shared_storage_exports_from_its_uri(s3, run_dir, tmp_path):
    """RUN as a URI (s3://): the checkpoint is fetched without its optimizer state, the records
    read from the bucket; the local copy is removed afterwards."""
    from safetensors.torch import load_file

    from rlaif_ray.remote_folder import StorageFolder, staging_root
    from rlaif_ray.run.export import export_policy

    uri = f"{s3}/export/run"
    StorageFolder(uri, run_dir).push()
    out = export_policy(uri, tmp_path / "hf", "step-4")
    _same_weights(load_file(str(out / "model.safetensors")),
                  load_file(str(run_dir / "checkpoints" / "step_000004" / "model.safetensors")))
    assert json.loads((out / "rlaif_ray_run.json").read_text())["source_run"] == uri
    assert "REWARD HACKING SUSPECTED" in (out / "README.md").read_text()
    assert not [p for p in (staging_root() / "export").rglob("*") if p.is_file() and not p.name.endswith(".lock")]


@pytest.mark.slow  # two gloo processes
def test_a_two_rank_fsdp_checkpoint_exports_the_gathered_policy(tiny_model_path, tmp_path):
    """The DCP shards of a real 2-rank FSDP learner (no HF weights in that checkpoint) give
    the policy the ranks held: the weights they gathered after training."""
    import numpy as np
    from safetensors.torch import load_file
    from test_fsdp import CFG, _two_ranks

    from rlaif_ray.run.export import policy_state, write_policy

    _two_ranks(tiny_model_path, tmp_path, dict(CFG, save_to=str(tmp_path / "ck"), hf_weights=False))
    assert not (tmp_path / "ck" / "model.safetensors").exists()
    write_policy(policy_state(tmp_path / "ck", tiny_model_path), Path(tiny_model_path), tmp_path / "hf")
    want = {k: torch.from_numpy(v) for k, v in np.load(tmp_path / "weights.npz").items()}
    _same_weights(load_file(str(tmp_path / "hf" / "model.safetensors")), want)
