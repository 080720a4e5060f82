"""The RL driver: prompts -> generators -> labelers -> learner group -> weights -> generators.

The whole loop is `train` below. Ray futures are used directly: the driver keeps up to
`max_staleness + 1` batches in flight, so generators sample batch k+1 (and labelers score
it) while the learner trains on batch k; with max_staleness = 0 it is the synchronous
on-policy loop.
"""
from __future__ import annotations

import os
import time
from collections import deque
from pathlib import Path

import ray

from . import schemas
from .config import Config, ConfigError
from .data import PromptSampler, load_tldr, prompt_batch, task_prompts
from .evaluate import check_eval_config, harmless_on, judge
from .devices import role_device
from .layout import bundle, check_layout, placement
from .learner import NonFiniteError
from .metrics import RoleMetrics
from .models import is_checkpoint, load_tokenizer, model_context
from .progress import gather
from .runlog import RunFolder
from .weight_sync import WeightVersionError


class StalenessError(RuntimeError):
    pass


class WeightSyncTimeout(RuntimeError):
    pass


def start_ray(cfg: Config) -> bool:
    """Start (or join) Ray; returns whether this call started it."""
    if ray.is_initialized():
        return False
    env = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        # a cluster: ray.address, or the one a `ray job submit` job runs in (RAY_ADDRESS is set);
        # the job's own runtime env (working dir) is kept, ours only adds variables
        ray.init(address=cfg.ray.address or "auto", runtime_env={"env_vars": env})
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.include_dashboard,
                 dashboard_host=cfg.ray.dashboard_host, runtime_env={"env_vars": env})
    return True


def preflight(cfg: Config) -> None:
    """Refuse a layout the cluster cannot hold before any actor starts (layout.check_layout)."""
    if not cfg.pipeline.check_resources:
        return
    if cfg.pipeline.cluster_resources:  # an autoscaling cluster's full-scale totals
        return check_layout(cfg, cfg.pipeline.cluster_resources)
    check_layout(cfg, ray.cluster_resources(), [n["Resources"] for n in ray.nodes() if n["Alive"]])


def place(name: str, role, tag: str, timeout: float) -> list[dict]:
    """Per-actor scheduling options of a role: bundle i of a placement group named ROLE@TAG
    (learner PACK, generators and labelers SPREAD unless the config says otherwise)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    strategy, one = placement(name, role), bundle(role)
    if strategy == "NONE" or not one:
        return [{}] * role.num_actors
    pg = ray.util.placement_group([one] * role.num_actors, strategy=strategy, name=f"{name}@{tag}")
    ready, _ = ray.wait([pg.ready()], timeout=timeout)
    if not ready:
        ray.util.remove_placement_group(pg)
        raise ConfigError(f"pipeline.{name}: placement group of {role.num_actors} x {one} ({strategy}) not placed "
                          f"within {timeout:.0f}s: the cluster lacks the resources (see `ray status`)")
    return [{"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, i)} for i in range(role.num_actors)]


def release(tag: str, names=("generators", "labelers", "learner")) -> None:
    """Remove a run's placement groups (they outlive killed actors until the driver exits)."""
    for name in names:
        try:
            ray.util.remove_placement_group(ray.util.get_placement_group(f"{name}@{tag}"))
        except ValueError:  # none by that name
            pass


def start_actors(cfg: Config, tag: str = ""):
    """Every role in its own actor (process), resources and placement from the config.
    `tag` makes the actor names unique per run, so they read as generator-0@RUN in the
    dashboard. Call release(tag) after killing them."""
    from actors.generator import RolloutGenerator
    from actors.labeler import Labeler
    from actors.reward_model import RewardModel

    p, m = cfg.pipeline, cfg.model

    def opts(name, role, label):
        where = place(name, role, tag, p.batch_timeout_s)
        return [dict(name=f"{label}-{i}@{tag}" if tag else f"{label}-{i}", num_cpus=role.num_cpus,
                     num_gpus=role.num_gpus, max_restarts=role.max_restarts, resources=role.resources,
                     runtime_env={"env_vars": thread_env(role)}, **where[i])
                for i in range(role.num_actors)]

    gens = [ray.remote(RolloutGenerator).options(max_concurrency=2, **o).remote(
        f"generator-{i}", m.name, m.dtype, cfg.generation.model_dump(), p.generators.torch_threads,
        role_device(p.generators.num_gpus), p.generators.vllm.model_dump()) for i, o in enumerate(opts("generators", p.generators, "generator"))]
    if cfg.reward.source == "rm":  # the reward-model pool takes the labelers' place and resources
        labelers = [ray.remote(RewardModel).options(**o).remote(
            f"reward-model-{i}", cfg.reward.rm_path, m.dtype, p.labelers.torch_threads, role_device(p.labelers.num_gpus),
            cfg.reward.batch_size, cfg.rm.max_tokens) for i, o in enumerate(opts("labelers", p.labelers, "reward-model"))]
    else:
        labelers = [ray.remote(Labeler).options(**o).remote(
            f"labeler-{i}", cfg.reward.model_dump(), cfg.reward.model or m.name, m.dtype, p.labelers.torch_threads,
            role_device(p.labelers.num_gpus), p.labelers.vllm.model_dump()) for i, o in enumerate(opts("labelers", p.labelers, "labeler"))]
    return gens, labelers, start_learner(cfg, tag)


def start_judge(cfg: Config, labelers: list, tag: str = ""):
    """The AI judge of the signal check and the win rate: the first labeler, or (when a
    reward model gives the rewards) a Labeler of its own, so the RM never grades itself."""
    from actors.labeler import Labeler

    if cfg.reward.source != "rm" or not (cfg.eval.win_rate or cfg.eval.signal_posts):
        return labelers[0]
    role = cfg.pipeline.labelers
    return ray.remote(Labeler).options(name=f"judge-0@{tag}" if tag else "judge-0", num_cpus=role.num_cpus,
                                       num_gpus=role.num_gpus, max_restarts=role.max_restarts,
                                       resources=role.resources, runtime_env={"env_vars": thread_env(role)}).remote(
        "judge-0", cfg.reward.model_dump(), cfg.reward.model or cfg.model.name, cfg.model.dtype, role.torch_threads,
        role_device(role.num_gpus), role.vllm.model_dump())


def thread_env(role) -> dict[str, str]:
    """OpenMP threads = the role's torch threads. Ray gives an actor OMP_NUM_THREADS=num_cpus
    (1 when fractional), and a process started with 1 ran the learner's 2-thread step about
    5-10% slower than one started with 2 (alternated runs, measured)."""
    return {"OMP_NUM_THREADS": str(role.torch_threads)}


def learner_malloc_env() -> dict[str, str]:
    """The learner only: glibc raises its mmap threshold after large frees, so the backward
    pass's freed activations stay resident; a fixed threshold hands them back (step peak
    3.95 -> 2.78 GiB, measured). Not for the other roles: the mmap churn slowed a labeler's
    padded forward by about a third (measured). A value already in the environment wins."""
    return {k: os.environ.get(k, v) for k, v in
            (("MALLOC_MMAP_THRESHOLD_", "65536"), ("MALLOC_TRIM_THRESHOLD_", "1048576"), ("MALLOC_ARENA_MAX", "2"))}


def start_learner(cfg: Config, tag: str = ""):
    """The learner group; its workers are not restarted one by one (a torch.distributed
    group cannot take a new member): the driver rebuilds the whole group instead."""
    from actors.learner import LearnerGroup, LearnerWorker

    role = cfg.pipeline.learner
    options = dict(num_cpus=role.num_cpus, num_gpus=role.num_gpus, max_restarts=0, resources=role.resources,
                   runtime_env={"env_vars": {**(learner_malloc_env() if cfg.rl.release_memory else {}),
                                             **thread_env(role)}})
    return LearnerGroup(ray.remote(LearnerWorker), role.num_actors, options, tag,
                        place("learner", role, tag, cfg.pipeline.batch_timeout_s),
                        model_name=cfg.model.name, dtype=cfg.model.dtype, rl_cfg=cfg.rl.model_dump(),
                        temperature=cfg.generation.temperature, torch_threads=role.torch_threads,
                        device=role_device(role.num_gpus))


def split(items: list, n: int) -> list[list]:
    k, r = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + k + (1 if i < r else 0)
        out.append(items[start:end])
        start = end
    return [o for o in out if o]


def wait_named(refs: list, names: list[str], timeout: float, what: str) -> list:
    """Results of `refs`, or WeightSyncTimeout naming every actor that did not answer
    within `timeout` seconds (never a hang)."""
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    if len(ready) < len(refs):
        ray.get(ready)  # a member that died is the cause: raise its error, not the timeout
        late = [n for n, r in zip(names, refs) if r not in ready]
        raise WeightSyncTimeout(f"{what} not acknowledged within {timeout:.0f}s by {late}")
    return ray.get(refs)  # re-raises an actor's own error


def check_acks(acks: list[int], names: list[str], version: int) -> None:
    wrong = [f"{n} holds version {a}" for n, a in zip(names, acks) if a != version]
    if wrong:
        raise WeightVersionError(f"weight sync to version {version}: {', '.join(wrong)}")


def sync_weights(gens, weights_ref, version: int, timeout: float, names: list[str] | None = None) -> None:
    """The object-store path: every generator stages the weights and acknowledges the
    version it now holds, which must be `version`."""
    names = names or [f"generator-{i}" for i in range(len(gens))]
    acks = wait_named([g.set_weights.remote(weights_ref, version) for g in gens], names, timeout,
                      f"weight sync to version {version}")
    check_acks(acks, names, version)


def broadcast_weights(learners: list, gens, version: int, timeout: float, names: list[str] | None = None,
                      dtype: str = "float32", bucket_mb: float = 256) -> None:
    """The broadcast path: learner rank 0 sends over the weight group (the other ranks take
    part in gathering the shards) while every generator receives; a member that does not
    answer within `timeout` is named."""
    names = names or [f"generator-{i}" for i in range(len(gens))]
    senders = [f"learner-{r}" for r in range(len(learners))]
    out = wait_named([w.broadcast_weights.remote(version, dtype, int(bucket_mb * 2**20)) for w in learners]
                     + [g.receive_weights.remote(version) for g in gens],
                     senders + names, timeout, f"weight broadcast of version {version}")
    check_acks(out[len(learners):], names, version)


def form_weight_group(learner0, gens, device: str, timeout: float, dtype: str = "float32",
                      bucket_mb: float = 256) -> None:
    """Rank 0 and the generators' engine workers (one rank each: a tensor-parallel engine
    brings several) join a new weight-broadcast group (NCCL on GPU, gloo on CPU); called at
    start and again whenever a member was replaced."""
    ranks = [i["weight_ranks"] for i in ray.get([g.info.remote() for g in gens])]
    first = [1 + sum(ranks[:i]) for i in range(len(gens))]
    backend, world = ("nccl" if device == "cuda" else "gloo"), 1 + sum(ranks)
    (master, port), spec = ray.get([learner0.host_store.remote("weights", world, timeout),
                                    learner0.weight_spec.remote(dtype)])
    wait_named([learner0.join_weight_group.remote(master, port, world, backend, timeout)]
               + [g.join_weight_group.remote(master, port, first[i], world, backend, spec, timeout,
                                             int(bucket_mb * 2**20)) for i, g in enumerate(gens)],
               ["learner-0"] + [f"generator-{i}" for i in range(len(gens))], timeout, "forming the weight group")


def _actor_died(err: Exception) -> bool:
    """A dead or restarting actor (directly, or as the failed input of a chained task)."""
    dead = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
    return isinstance(err, dead) or isinstance(getattr(err, "cause", None), dead)


class StaleShard(RuntimeError):
    pass


class Rollouts:
    """One batch in flight: a shard per generator, each chained into a labeler. A shard
    whose generator or labeler dies is re-dispatched (same ids, same seed) once Ray has
    restarted the actor, after the generator got the current weights back."""

    def __init__(self, pipe: "Pipeline", items, batch_index, samples, seed, mode, temperature=None):
        self.pipe, self.index = pipe, batch_index
        self.shards = [(i, shard, (batch_index, samples, seed + i, temperature), mode)
                       for i, shard in enumerate(split(items, len(pipe.gens)))]
        self.refs = [self._launch(*sh) for sh in self.shards]

    def _launch(self, i, shard, gen_args, mode):
        rollouts = self.pipe.gens[i].generate.remote(prompt_batch(shard), *gen_args)
        self.pipe.generating.append(rollouts)
        return self.pipe.labelers[i % len(self.pipe.labelers)].score.remote(rollouts, mode)

    def get(self, timeout: float) -> "schemas.pa.RecordBatch":
        out = []
        for k, sh in enumerate(self.shards):
            for attempt in range(self.pipe.max_retries + 1):
                try:
                    shard = ray.get(self.refs[k], timeout=timeout)
                    oldest = self.pipe.version - self.pipe.cfg.rl.max_staleness
                    if self.index >= 0 and min(shard.column("policy_version").to_pylist()) < oldest:
                        # a restarted generator ran this before it got the current weights back
                        raise StaleShard(f"policy version below {oldest}")
                    out.append(shard)
                    break
                except Exception as err:  # noqa: BLE001 -- re-raised unless an actor died
                    if not (_actor_died(err) or isinstance(err, StaleShard)) or attempt == self.pipe.max_retries:
                        raise
                    t0 = time.perf_counter()
                    self.pipe.log(f"batch {self.index} shard {k}: {type(err).__name__} ({err}); "
                                  "re-dispatching after the generator has the current weights")
                    self.pipe.restore_generator(sh[0])
                    self.refs[k] = self._launch(*sh)
                    self.pipe.recoveries.append({"batch_index": self.index, "shard": k, "error": type(err).__name__,
                                                 "restore_s": time.perf_counter() - t0})
        return schemas.concat(out, schemas.SCORED)


class Pipeline:
    """The actors of a run, with the latest published weights so that a restarted
    generator (or a rebuilt learner group) can be brought back to the current version."""

    def __init__(self, cfg: Config, tag: str, log=print):
        self.cfg, self.tag, self.log = cfg, tag, log
        self.gens, self.labelers, self.learner = start_actors(cfg, tag)
        self.judge = start_judge(cfg, self.labelers, tag)
        infos = gather([a.info.remote() for a in self.actors()], "loading models", cfg.run.progress, unit="actor")
        self.weight_dtype = infos[0]["weight_dtype"]  # generators come first: the dtype they hold weights in
        self.version = 0
        p = cfg.pipeline
        gpus = p.learner.num_gpus > 0 and p.generators.num_gpus > 0
        self.broadcast = p.weight_sync == "broadcast" or (p.weight_sync == "auto" and gpus)
        self.group_device, self.regroup = ("cuda" if gpus else "cpu"), self.broadcast
        self.max_retries = max(cfg.pipeline.generators.max_restarts, cfg.pipeline.labelers.max_restarts)
        self.recoveries: list[dict] = []
        self.checkpoint: str | None = None  # last checkpoint written
        self.metrics = RoleMetrics("driver", tag)  # queue depth, lag, reward, KL on the dashboard
        self.replay: list = []  # batches trained since that checkpoint
        self.generating: list = []  # generate calls launched (a broadcast waits for them to finish)

    def actors(self) -> list:
        own_judge = [] if any(self.judge is x for x in self.labelers) else [self.judge]
        return self.gens + self.labelers + own_judge + self.learner.workers

    def wait_alive(self, actor) -> None:
        """Block until Ray has restarted `actor` (calls fail fast while it restarts);
        an actor out of restarts raises."""
        deadline = time.time() + self.cfg.pipeline.batch_timeout_s
        while True:
            try:
                ray.get(actor.info.remote(), timeout=max(1.0, deadline - time.time()))
                return
            except ray.exceptions.ActorUnavailableError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)

    def restore_generator(self, i: int) -> None:
        """After a failure on shard i: wait for its generator and labeler, then give the
        generator the current weights (a restarted one starts from the initial ones)."""
        self.wait_alive(self.gens[i])
        self.wait_alive(self.labelers[i % len(self.labelers)])
        if self.version > 0:  # through the object store, whatever the sync path (its group is re-formed)
            weights = self.learner.weights(self.weight_dtype)  # the learner is at self.version between publishes
            ray.get(self.gens[i].set_weights.remote(weights, self.version), timeout=self.cfg.pipeline.batch_timeout_s)
            self.regroup = self.broadcast

    def publish(self, version: int) -> None:
        """Rank 0's weights to every generator, tagged with the version: through the object
        store, or broadcast over the weight group (pipeline.weight_sync)."""
        self.version = version
        if self.generating:  # keep the generate calls still sampling
            self.generating = ray.wait(self.generating, num_returns=len(self.generating), timeout=0)[1]
        weights = None  # not kept: the store frees each version once every generator installed it
        if not self.broadcast:
            weights = self.learner.weights(self.weight_dtype)
            try:
                # runs after get_weights in rank 0's order, so it fails if the learner died (and
                # the weights are not fetched into the driver)
                ray.get(self.learner.workers[0].info.remote())
            except Exception as err:  # noqa: BLE001
                if not _actor_died(err):
                    raise
                self.rebuild_learner(err)
                weights = self.learner.weights(self.weight_dtype)
        p = self.cfg.pipeline
        timeout = p.sync_timeout_s
        for attempt in range(self.max_retries + 1):
            try:
                if not self.broadcast:
                    return sync_weights(self.gens, weights, version, timeout)
                # receivers load buckets in place, so a generator mid-batch would hold the group's
                # collective open: let the batches in flight finish sampling first
                if self.generating:
                    ray.wait(self.generating, num_returns=len(self.generating), timeout=p.batch_timeout_s)
                if self.regroup:
                    form_weight_group(self.learner.workers[0], self.gens, self.group_device, timeout,
                                      self.weight_dtype, p.sync_bucket_mb)
                    self.regroup = False
                return broadcast_weights(self.learner.workers, self.gens, version, timeout,
                                         dtype=self.weight_dtype, bucket_mb=p.sync_bucket_mb)
            except Exception as err:  # noqa: BLE001
                # a broadcast that timed out: the members still inside it fail at the group's own
                # timeout (the same sync_timeout_s); a new group is formed and the version re-sent
                timed_out = self.broadcast and isinstance(err, WeightSyncTimeout)
                if not (_actor_died(err) or timed_out) or attempt == self.max_retries:
                    raise
                self.log(f"weight sync v{version}: {err}; re-forming the weight group and retrying" if timed_out else
                         f"weight sync v{version}: an actor died ({type(err).__name__}); retrying")
                if timed_out:
                    self.regroup = True
                    continue
                if self.broadcast:  # rank 0 itself may be the one that died
                    try:
                        ray.get(self.learner.workers[0].info.remote(), timeout=timeout)
                    except Exception as err0:  # noqa: BLE001
                        if not _actor_died(err0):
                            raise
                        self.rebuild_learner(err0)
                for g in self.gens:
                    self.wait_alive(g)
                self.regroup = self.broadcast

    def train(self, batch) -> dict:
        """One learner step; a dead learner worker is replaced (rebuild_learner) and the
        step retried. The batch then joins `replay` until the next checkpoint."""
        for attempt in range(self.cfg.pipeline.learner.max_restarts + 1):
            try:
                stats = self.learner.train(batch, self.cfg.rl.loss_agg)
                self.replay.append(batch)
                return stats
            except Exception as err:  # noqa: BLE001
                if not _actor_died(err) or attempt == self.cfg.pipeline.learner.max_restarts:
                    raise
                self.rebuild_learner(err)
        raise AssertionError("unreachable")

    def rebuild_learner(self, err: Exception) -> None:
        """A torch.distributed group cannot take a new member: rebuild the whole group from
        the last checkpoint (or the initial weights) and replay, in order, the batches
        trained since, so every batch ends up in the weights exactly once."""
        t0 = time.perf_counter()
        self.log(f"learner worker died ({type(err).__name__}); rebuilding the group from "
                 f"{self.checkpoint or 'the initial weights'} and replaying {len(self.replay)} batch(es)")
        for w in self.learner.workers:
            ray.kill(w)
        release(self.learner.tag, ["learner"])
        self.learner = start_learner(self.cfg, f"{self.tag}-r{len(self.recoveries) + 1}")
        if self.checkpoint:
            self.learner.load(self.checkpoint)
        for old in self.replay:
            self.learner.train(old, self.cfg.rl.loss_agg)
        self.recoveries.append({"learner": True, "error": type(err).__name__, "replayed": len(self.replay),
                                "restore_s": time.perf_counter() - t0})
        self.regroup = self.broadcast  # the new rank 0 is not in the weight group yet

    def checkpointed(self, path: str) -> None:
        self.checkpoint, self.replay = path, []

    def kill(self) -> None:
        for a in self.actors():
            ray.kill(a)
        release(self.tag)
        release(self.learner.tag, ["learner"])


def evaluate(pipe: Pipeline, items, cfg: Config) -> dict:
    """Mean reward and response length on held-out prompts, same seeds every time; in
    chunks of eval.batch_size prompts per generator (one call over 48 prompts held GBs)."""
    n = cfg.eval.batch_size * len(pipe.gens)
    chunks = [Rollouts(pipe, items[i:i + n], -1, 1, cfg.rl.seed + 999 + i, "direct", cfg.eval.temperature)
              for i in range(0, len(items), n)]
    batch = schemas.concat([c.get(cfg.pipeline.batch_timeout_s) for c in chunks], schemas.SCORED)
    rewards = batch.column("reward").to_pylist()
    lengths = [len(t) for t in batch.column("response_token_ids").to_pylist()]
    ids = batch.column("prompt_id").to_pylist()
    return {"reward_mean": sum(rewards) / len(rewards), "length_tokens": sum(lengths) / len(lengths),
            "n": len(rewards), "rewards": dict(zip(ids, rewards)),
            "responses": dict(zip(ids, batch.column("response_text").to_pylist())),
            "examples": batch.select(["prompt_id", "response_text", "reward"]).to_pylist()[:3]}


def win_rate_vs_initial(pipe: Pipeline, items, before: dict, now: dict, step: int, run: RunFolder) -> dict:
    """The current policy's held-out responses against the initial policy's (same prompts,
    same seed), judged in both orders by the first labeler (METHOD.md 7)."""
    ids = [it["prompt_id"] for it in items]
    rows, s = judge(pipe.judge, items, [now["responses"][i] for i in ids], [before["responses"][i] for i in ids],
                    pipe.cfg, harmless_on(pipe.cfg), desc=f"step {step} win rate:")
    run.log_judgements(rows, step)
    if "win_rate" not in s:
        return {"step": step, "n": 0, "unusable_labels": s["unusable_labels"]}
    w, lc = s["win_rate"], s["length_controlled"]
    row = {"step": step, "win_rate": w["win_rate"], "ci95": w["ci95"], "n": w["n"], "ties": w["ties"],
           "length_controlled": lc["value"], "length_controlled_ci95": lc.get("ci95"),
           "soft_win_rate": s["soft_win_rate"]["mean"], "unusable_labels": s["unusable_labels"],
           "mean_chars": s["mean_chars"], **({"harmless": s["harmless"]} if "harmless" in s else {})}
    run.log_winrate(row)
    pipe.metrics.set("eval_win_rate", w["win_rate"])
    pipe.log(f"step {step}: held-out win rate against the initial policy {w['win_rate']:.1%} "
             f"(95% CI {w['ci95'][0]:.1%}-{w['ci95'][1]:.1%}, n={w['n']}); length-controlled {lc['value']:.1%}; "
             f"mean chars {s['mean_chars']['a']:.0f} vs {s['mean_chars']['b']:.0f}")
    return row


def paired_change(before: dict, after: dict) -> tuple[float, float]:
    """Mean per-prompt reward change and its 95% half-width (normal approximation)."""
    diffs = [after[k] - before[k] for k in before if k in after]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5 if n > 1 else float("nan")
    return mean, 1.96 * sd / n ** 0.5


def train(cfg: Config, out: str | Path | None = None, log=print, resume: str | Path | None = None) -> Path:
    tok = load_tokenizer(cfg.model.name)
    context = model_context(cfg.model.name)
    if cfg.task.max_prompt_tokens + cfg.generation.max_new_tokens > context:
        raise ConfigError(f"task.max_prompt_tokens={cfg.task.max_prompt_tokens} + generation.max_new_tokens="
                          f"{cfg.generation.max_new_tokens} exceeds the model's context of {context} tokens")
    if cfg.reward.backend == "openai" and cfg.reward.source != "pairwise":
        raise ConfigError("reward.backend=openai reads '1'/'2' from an endpoint's top log-probs: "
                          "it needs reward.source=pairwise")
    if cfg.eval.win_rate and cfg.eval.num_prompts:
        check_eval_config(cfg)
    if cfg.reward.source == "pairwise":  # a bad exemplar file stops the run before any actor starts
        from .labeling import PairwiseOptions

        PairwiseOptions.from_config(cfg.reward.pairwise)
    if cfg.reward.source == "rm" and not is_checkpoint(cfg.reward.rm_path):
        raise ConfigError(f"reward.rm_path={cfg.reward.rm_path}: no model.safetensors (train one with `rlaif-ray train-rm`)")
    prompts = task_prompts(cfg.task, tok)
    if cfg.rl.prompts_per_step > len(prompts.train):
        raise ConfigError(f"rl.prompts_per_step={cfg.rl.prompts_per_step} exceeds the {len(prompts.train)} train prompts")
    log(f"prompts: {len(prompts.train)} train, {len(prompts.heldout)} held out; "
        f"{prompts.skipped_long} skipped and {prompts.truncated} truncated (> {cfg.task.max_prompt_tokens} tokens)"
        + "".join(f"; {n}" for n in prompts.notes))
    run = RunFolder(cfg, resume or out, resume=resume is not None)  # only once the inputs are known good
    started = start_ray(cfg)
    try:
        preflight(cfg)
    except ConfigError:
        run.close()
        if started:
            ray.shutdown()
        raise
    pipe = Pipeline(cfg, run.path.name, log)
    try:
        summary = run.read_json("summary_start.json") if resume else {}
        summary.update({"run_dir": str(run.path), "skipped_long_prompts": prompts.skipped_long,
                        "processes": {i["name"]: i["pid"] for i in ray.get([a.info.remote() for a in pipe.actors()])}})
        run.write_json("processes.json", summary["processes"])
        eval_items = prompts.heldout[:cfg.eval.num_prompts]
        if not resume:
            if cfg.eval.signal_posts and cfg.task.name == "tldr":  # how far can this judge be trusted?
                rows = load_tldr(cfg.task.data_path)
                heldout_rows = rows[-max(cfg.eval.signal_posts + 1, cfg.task.heldout_size):]
                sig = ray.get(pipe.judge.signal.remote(heldout_rows, cfg.eval.signal_posts))
                summary["signal"] = sig
                log(f"judge signal ({sig['scorer']}): reference summary beats another post's summary "
                    f"{sig['reference_wins']:.0%} of {sig['n']} (95% CI {sig['ci95'][0]:.0%}-{sig['ci95'][1]:.0%}; "
                    "50% = no signal)")
            if eval_items:
                summary["heldout_before"] = evaluate(pipe, eval_items, cfg)
                log(f"held-out reward before training: {summary['heldout_before']['reward_mean']:+.4f} "
                    f"(mean length {summary['heldout_before']['length_tokens']:.1f} tokens)")
            run.write_json("summary_start.json", summary)

        sampler = PromptSampler(prompts.train, cfg.rl.seed)
        first_step, version, launched = 1, 0, 0
        if resume:  # continue exactly after the last checkpoint: weights, optimizer, data position
            checkpoint, state = run.latest_checkpoint()
            pipe.learner.load(checkpoint)
            pipe.checkpointed(checkpoint)
            first_step, version, launched = state["step"] + 1, state["policy_version"], state["next_batch_index"]
            sampler.load_state(state["sampler"])
            run.truncate_after(state["step"])
            pipe.publish(version)
            log(f"resumed {run.path} at step {state['step']} (policy version {version})")
        inflight: deque = deque()  # (sampler state before the batch, Rollouts)
        trained, t_loop = 0, time.perf_counter()
        for step in range(first_step, cfg.rl.steps + 1):
            # keep up to max_staleness + 1 batches in flight: overlap without exceeding the lag bound
            while launched < cfg.rl.steps and len(inflight) <= cfg.rl.max_staleness:
                state = sampler.state()
                items = sampler.next(cfg.rl.prompts_per_step)
                inflight.append((state, Rollouts(pipe, items, launched, cfg.rl.samples_per_prompt,
                                                 cfg.rl.seed * 1_000_003 + launched * 101, cfg.reward.source)))
                launched += 1
            _, rollouts = inflight.popleft()
            t_wait = time.perf_counter()
            batch = rollouts.get(cfg.pipeline.batch_timeout_s)
            waited = time.perf_counter() - t_wait
            lag = version - min(batch.column("policy_version").to_pylist())
            if lag > cfg.rl.max_staleness:
                raise StalenessError(f"batch {rollouts.index} has policy lag {lag} > rl.max_staleness={cfg.rl.max_staleness}")

            try:
                stats = pipe.train(batch)
            except NonFiniteError as err:  # nothing was applied; the last checkpoint is the last good one
                raise NonFiniteError(f"step {step}: {err}; last good checkpoint: {pipe.checkpoint}") from None
            version += 1
            pipe.publish(version)

            trained += batch.num_rows
            rewards = batch.column("reward").to_pylist()
            lengths = [len(t) for t in batch.column("response_token_ids").to_pylist()]
            row = {"step": step, "policy_version": version, "batch_index": rollouts.index, "staleness": lag,
                   "reward_mean": sum(rewards) / len(rewards), "kl": stats["kl"], "loss": stats["loss"],
                   "pg_loss": stats["pg_loss"], "value_loss": stats["value_loss"],
                   "ratio_mean": stats["ratio_mean"], "ratio_clipped_frac": stats["ratio_clipped_frac"],
                   "grad_norm": stats["grad_norm"], "response_len": sum(lengths) / len(lengths),
                   "truncated": sum(batch.column("truncated").to_pylist()),
                   "unusable_labels": batch.num_rows - sum(batch.column("reward_ok").to_pylist()),
                   "completions": batch.num_rows, "completions_per_s": trained / (time.perf_counter() - t_loop),
                   "waited_for_batch_s": waited, "elapsed_s": time.perf_counter() - t_loop}
            run.log_metrics(row)
            for k, v in (("queue_depth", len(inflight)), ("policy_lag", lag), ("reward_mean", row["reward_mean"]),
                         ("kl", row["kl"]), ("learner_wait_s", waited)):
                pipe.metrics.set(k, v)
            if cfg.run.log_rollouts:
                run.log_rollouts(batch, step)
            log(f"step {step:3d}/{cfg.rl.steps} | v{version} | reward {row['reward_mean']:+.4f} | kl {row['kl']:+.4f} "
                f"| loss {row['loss']:+.4f} | {row['completions_per_s']:.2f} compl/s | staleness {lag} "
                f"| len {row['response_len']:.1f}")
            if step == cfg.rl.steps or (cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0):
                nxt = (inflight[0][0], inflight[0][1].index) if inflight else (sampler.state(), launched)
                checkpoint = str(run.checkpoint_dir(step))
                pipe.learner.save(checkpoint, {"step": step, "policy_version": version,
                                               "next_batch_index": nxt[1], "sampler": nxt[0]})
                run.mark_checkpoint(step)
                pipe.checkpointed(checkpoint)
            if cfg.eval.win_rate and cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.rl.steps \
                    and "heldout_before" in summary:  # "is it learning?" while it runs
                win_rate_vs_initial(pipe, eval_items, summary["heldout_before"], evaluate(pipe, eval_items, cfg), step, run)

        summary["loop_s"] = time.perf_counter() - t_loop
        summary["completions_per_s"] = trained / summary["loop_s"]
        summary["recoveries"] = pipe.recoveries
        if eval_items and "heldout_before" in summary:
            summary["heldout_after"] = evaluate(pipe, eval_items, cfg)
            b, a = summary["heldout_before"], summary["heldout_after"]
            delta, half = paired_change(b["rewards"], a["rewards"])
            summary["heldout_change"] = {"mean": delta, "ci95_halfwidth": half}
            log(f"held-out reward (same frozen judge, {a['n']} prompts): initial {b['reward_mean']:+.4f} -> "
                f"final {a['reward_mean']:+.4f} ({delta:+.4f} +- {half:.4f}, paired 95% CI); "
                f"length {b['length_tokens']:.1f} -> {a['length_tokens']:.1f} tokens")
            if cfg.eval.win_rate:  # did it learn? the final policy against the initial one
                summary["win_rate"] = win_rate_vs_initial(pipe, eval_items, b, a, cfg.rl.steps, run)
        final = ray.get([a.info.remote() for a in pipe.actors()])
        summary["stage_busy_s"] = {i["name"]: i["busy_s"] for i in final}
        summary["processes"] = {i["name"]: i["pid"] for i in final}  # after any restart
        run.write_json("summary.json", summary)
        if cfg.run.report:
            from .report import train_report

            log(f"report: {train_report(run.path)}")
        log(f"run folder: {run.path}")
        return run.path
    finally:
        run.close()
        pipe.kill()
        if started:
            ray.shutdown()
