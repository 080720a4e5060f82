"""The actors of a training run and the protocol between them: batches in flight, the
policy version, weight sync to the generators, and recovery from a dead actor.

    prompts -> [generators] -> rollouts -> [labelers | reward models] -> scored -> [learner group]
                  ^                                                                     |
                  +------------------- weights, tagged with the policy version ---------+

`Pipeline` owns the policy version: `launch` keeps up to rl.max_staleness + 1 batches in
flight, `take` returns the oldest (its shards checked against the lag bound), `train` runs
one learner step and publishes the new version. A dead generator or labeler costs a
re-dispatch of its shard; a dead learner rank costs a rebuild of the group from the last
checkpoint and a replay of the batches trained since (no sample lost, none trained twice).
"""
from __future__ import annotations

import time
from collections import deque

import ray

from rlaif_ray.config import Config, broadcasts_weights, judge_sources, reference_on_labelers
from rlaif_ray.cpu.allocator import learner_env
from rlaif_ray.data import schemas
from rlaif_ray.data.tasks import prompt_batch
from rlaif_ray.engines.devices import role_device
from rlaif_ray.rl.losses import adaptive_kl_beta

from .generator import generator_actor
from .group import ActorGroup
from .labeler import Labeler
from .learner import LearnerGroup, LearnerWorker
from .metrics import RoleMetrics
from .ray_session import actor_died, actor_options, gather, place, release
from .reward_model import RewardModel
from .weights import WeightSyncTimeout, broadcast_weights, form_weight_group, sync_weights


class StalenessError(RuntimeError):
    """A batch sampled by a policy older than rl.max_staleness allows, after every retry."""


# ---- starting the actors: what each role is constructed with ------------------------------

def generator_engine(cfg: Config) -> dict:
    """The generators' vLLM settings, sized to what they are given: no sequence longer than a
    capped prompt and its response, and (auto KV cache on CPU) one step's rollouts at once."""
    v = cfg.pipeline.generators.vllm.model_dump()
    v["max_model_len"] = v["max_model_len"] or cfg.task.max_prompt_tokens + cfg.generation.max_new_tokens
    v["kv_sequences"] = cfg.rl.prompts_per_step * cfg.rl.samples_per_prompt
    return v


def generator_args(cfg: Config, name: str, model: str | None = None, generation: dict | None = None) -> tuple:
    """A RolloutGenerator's arguments: the policy `model` (default model.name) sampling with
    `generation` (default the config's generation section)."""
    g = cfg.pipeline.generators
    # the run's policy under model.lora: its base model with the learner's adapter (another model: none)
    lora = cfg.model.lora.model_dump() if cfg.model.lora is not None and model is None else None
    return (name, model or cfg.model.name, cfg.model.dtype, generation or cfg.generation.model_dump(),
            g.torch_threads, role_device(g.num_gpus), generator_engine(cfg), lora)


def labeler_args(cfg: Config, name: str, judge: bool = True) -> tuple:
    """A Labeler's arguments: the config's reward section on the labelers' resources (also
    the judge of `eval` and of the win rate); `judge`: load the AI judge even when no reward
    source needs it (a python or http reward's pool does not)."""
    lab = cfg.pipeline.labelers
    return (name, cfg.reward.model_dump(), cfg.reward.model or cfg.model.name, cfg.model.dtype, lab.torch_threads,
            role_device(lab.num_gpus), lab.vllm.model_dump(), judge)


def reward_model_args(cfg: Config, name: str) -> tuple:
    lab = cfg.pipeline.labelers
    return (name, cfg.reward.rm_path, cfg.model.dtype, lab.torch_threads, role_device(lab.num_gpus),
            cfg.reward.batch_size, cfg.rm.max_tokens)


def start_learner(cfg: Config, tag: str = "") -> LearnerGroup:
    """The learner group; its ranks are not restarted one by one (a torch.distributed group
    cannot take a new member): Pipeline.rebuild_learner rebuilds the whole group instead."""
    role = cfg.pipeline.learner
    device = role_device(role.num_gpus)
    env = learner_env() if cfg.rl.release_memory and device == "cpu" else {}
    options = actor_options(role, "", restarts=False, env=env)
    options.pop("name")  # the group names its ranks learner-R@TAG
    return LearnerGroup(ray.remote(LearnerWorker), role.num_actors, options, tag,
                        place("learner", role, tag, cfg.pipeline.batch_timeout_s), model_name=cfg.model.name,
                        dtype=cfg.model.dtype, rl_cfg=cfg.rl.model_dump(), temperature=cfg.generation.temperature,
                        top_k=cfg.generation.top_k, top_p=cfg.generation.top_p, torch_threads=role.torch_threads,
                        device=device, reference=not reference_on_labelers(cfg),
                        lora=cfg.model.lora.model_dump() if cfg.model.lora is not None else None)


def start_actors(cfg: Config, tag: str = "") -> tuple[ActorGroup, ActorGroup, LearnerGroup]:
    """Every pool of a training run: generators, the reward pool (AI labelers, or with
    reward.source=rm reward models in their place) and the learner group; `tag` makes the
    names unique per run (generator-0@RUN in the dashboard). Call release(tag) after killing them."""
    p, timeout = cfg.pipeline, cfg.pipeline.batch_timeout_s
    if any(r.torch_threads == "auto" for r in (p.generators, p.labelers, p.learner)):
        raise ValueError("torch_threads: auto is resolved at start-up: pass the config through "
                         "rlaif_ray.run.resolve.resolve_auto first")
    gens = ActorGroup.start(generator_actor(), "generators", "generator", p.generators, tag,
                            lambda i: generator_args(cfg, f"generator-{i}"), timeout)
    if cfg.reward.source == "rm":
        labelers = ActorGroup.start(ray.remote(RewardModel), "labelers", "reward-model", p.labelers, tag,
                                    lambda i: reward_model_args(cfg, f"reward-model-{i}"), timeout)
    else:
        labelers = ActorGroup.start(ray.remote(Labeler), "labelers", "labeler", p.labelers, tag,
                                    lambda i: labeler_args(cfg, f"labeler-{i}", bool(judge_sources(cfg.reward))),
                                    timeout)
    return gens, labelers, start_learner(cfg, tag)


def eval_labeler(cfg: Config, labelers: ActorGroup, tag: str = ""):
    """The AI labeler of the signal check and the win rate: the first labeler, or a Labeler of
    its own when eval.judge_model names another model or when a reward model, a function or a
    server gives the rewards (so the RM never grades itself and a python or http reward's pool
    holds no judge)."""
    if not (cfg.eval.win_rate or cfg.eval.signal_posts) or (judge_sources(cfg.reward) and not cfg.eval.judge_model):
        return labelers[0]
    judge = cfg.pipeline.labelers.model_copy(update={"num_actors": 1})
    return ActorGroup.start(ray.remote(Labeler), "judge", "judge", judge, tag,
                            lambda i: labeler_args(judge_config(cfg), "judge-0"), cfg.pipeline.batch_timeout_s,
                            placed=False)[0]


def judge_config(cfg: Config) -> Config:
    """The config a judge Labeler starts from: the reward's, with eval.judge_model as its model."""
    if not cfg.eval.judge_model:
        return cfg
    out = cfg.model_copy(deep=True)
    out.reward.model = cfg.eval.judge_model
    return out


# ---- batches in flight -------------------------------------------------------------------

def split(items: list, n: int) -> list[list]:
    k, r = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + k + (1 if i < r else 0)
        out.append(items[start:end])
        start = end
    return [o for o in out if o]


class Rollouts:
    """One batch in flight: a shard per generator, each chained into a labeler. A shard
    whose generator or labeler died, or that a restarted generator sampled before it got
    the current weights back (older than the lag bound), is re-dispatched (same ids, same
    seed) once the actor is back with the current weights."""

    def __init__(self, pipe: "Pipeline", items, batch_index, samples, seed, mode, temperature=None):
        self.pipe, self.index = pipe, batch_index
        self.shards = [(i, shard, (batch_index, samples, seed + i, temperature), mode)
                       for i, shard in enumerate(split(items, len(pipe.gens)))]
        self.refs = [self._launch(*sh) for sh in self.shards]

    def _launch(self, i, shard, gen_args, mode):
        rollouts = self.pipe.gens[i].generate.remote(prompt_batch(shard), *gen_args)
        self.pipe.generating.append(rollouts)
        # training batches: the labeler also computes the reference log-probs (rl.reference)
        ref_t = self.pipe.reference_temperature if self.index >= 0 else None
        # held-out batches (index < 0) draw one sample a prompt: a pairwise source reads its direct scorer
        return self.pipe.labelers[i % len(self.pipe.labelers)].score.remote(rollouts, mode, ref_t, self.index < 0)

    def get(self, timeout: float) -> "schemas.pa.RecordBatch":
        out = []
        for k, sh in enumerate(self.shards):
            for attempt in range(self.pipe.max_retries + 1):
                try:
                    shard = ray.get(self.refs[k], timeout=timeout)
                    oldest = self.pipe.oldest_allowed()
                    if self.index >= 0 and min(shard.column("policy_version").to_pylist()) < oldest:
                        raise StalenessError(f"batch {self.index} shard {k} has policy version below {oldest} "
                                             f"(rl.max_staleness={self.pipe.cfg.rl.max_staleness})")
                    out.append(shard)
                    break
                except Exception as err:  # noqa: BLE001 -- re-raised unless an actor died or lagged
                    if not (actor_died(err) or isinstance(err, StalenessError)) or attempt == self.pipe.max_retries:
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
    """The actors of a run, the policy version and the batches in flight; keeps the latest
    published weights reachable so a restarted generator (or a rebuilt learner group) can be
    brought back to the current version."""

    def __init__(self, cfg: Config, tag: str, log=print):
        self.cfg, self.tag, self.log = cfg, tag, log
        self.gens, self.labelers, self.learner = start_actors(cfg, tag)
        self.eval_labeler = eval_labeler(cfg, self.labelers, tag)
        infos = gather([a.info.remote() for a in self.actors()], "loading models", cfg.run.progress, unit="actor")
        self.weight_dtype = infos[0]["weight_dtype"]  # generators come first: the dtype they hold weights in
        self.version = 0  # the policy version the learner holds and the generators get next
        # the KL weight of the next step: rl.beta throughout, or (rl.kl_control: adaptive) where
        # the controller moved it after each step; checkpoints keep it (trainer_state.json kl_beta)
        self.beta = cfg.rl.beta
        # rl.reference: the labelers compute log pi_ref at the sampling temperature (None: the learner)
        self.reference_temperature = cfg.generation.temperature if reference_on_labelers(cfg) else None
        p = cfg.pipeline
        gpus = p.learner.num_gpus > 0 and p.generators.num_gpus > 0
        self.broadcast = broadcasts_weights(p, cfg.model.lora is not None)
        self.group_device, self.regroup = ("cuda" if gpus else "cpu"), self.broadcast
        self.max_retries = max(p.generators.max_restarts, p.labelers.max_restarts)
        self.recoveries: list[dict] = []
        self.checkpoint: str | None = None  # last checkpoint written
        self.metrics = RoleMetrics("driver", tag)  # queue depth, lag, reward, KL on the dashboard
        self.replay: list = []  # (batch, beta) trained since that checkpoint
        self.generating: list = []  # generate calls launched (a broadcast waits for them to finish)
        self.inflight: deque = deque()  # (sampler state before the batch, Rollouts), oldest first
        self.launched = 0  # batches launched so far (the next batch's index)

    def actors(self) -> list:
        own = [] if any(self.eval_labeler is x for x in self.labelers) else [self.eval_labeler]
        return [*self.gens, *self.labelers, *own, *self.learner.workers]

    def oldest_allowed(self) -> int:
        return self.version - self.cfg.rl.max_staleness

    # -- the RL loop's four calls: launch, take, train (publishes), resume_point --

    def launch(self, sampler) -> None:
        """Keep up to rl.max_staleness + 1 batches in flight: the generators and labelers work
        on the next batches while the learner trains, never beyond the lag bound."""
        rl = self.cfg.rl
        while self.launched < rl.steps and len(self.inflight) <= rl.max_staleness:
            state = sampler.state()
            items = sampler.next(rl.prompts_per_step)
            self.inflight.append((state, Rollouts(self, items, self.launched, rl.samples_per_prompt,
                                                  rl.seed * 1_000_003 + self.launched * 101, self.cfg.reward.source)))
            self.launched += 1

    def take(self) -> tuple:
        """The oldest batch in flight: (scored batch, its index, policy lag, seconds waited)."""
        _, rollouts = self.inflight.popleft()
        t0 = time.perf_counter()
        batch = rollouts.get(self.cfg.pipeline.batch_timeout_s)
        lag = self.version - min(batch.column("policy_version").to_pylist())
        return batch, rollouts.index, lag, time.perf_counter() - t0

    def resume_point(self, sampler) -> tuple[dict, int]:
        """(sampler state, batch index) of the first batch not yet trained: what a checkpoint
        records so a resumed run continues exactly there."""
        if self.inflight:
            return self.inflight[0][0], self.inflight[0][1].index
        return sampler.state(), self.launched

    def train(self, batch) -> dict:
        """One learner step at KL weight `self.beta` (returned as stats["beta"]), then the new
        version to every generator and, with rl.kl_control adaptive, the next step's beta from
        this step's KL per sequence. A dead learner rank is replaced (rebuild_learner) and the
        step retried; the batch joins `replay` (with its beta) until the next checkpoint."""
        beta = self.beta
        for attempt in range(self.cfg.pipeline.learner.max_restarts + 1):
            try:
                stats = self.learner.train(batch, self.cfg.rl.loss_agg, beta)
                self.replay.append((batch, beta))
                break
            except Exception as err:  # noqa: BLE001
                if not actor_died(err) or attempt == self.cfg.pipeline.learner.max_restarts:
                    raise
                self.rebuild_learner(err)
        self.publish(self.version + 1)
        self.beta = self.next_beta(beta, stats)
        return {**stats, "beta": beta}

    def next_beta(self, beta: float, stats: dict) -> float:
        """The KL weight after a step at `beta` that measured `stats`: unchanged for
        rl.kl_control fixed (or a step without usable rows), else the adaptive controller's
        (rl.adaptive_kl_beta) on the step's KL per sequence over its usable rows."""
        rl = self.cfg.rl
        if rl.kl_control != "adaptive" or not stats.get("usable_rows"):
            return beta
        return adaptive_kl_beta(beta, stats["kl_sum"] / stats["usable_rows"], rl.kl_target, rl.kl_horizon,
                                stats["usable_rows"], rl.kl_beta_min, rl.kl_beta_max)

    def save(self, path: str, step: int, sampler, hf_weights: bool = True) -> None:
        state, index = self.resume_point(sampler)
        self.learner.save(path, {"step": step, "policy_version": self.version, "next_batch_index": index,
                                 "sampler": state, "kl_beta": self.beta}, hf_weights)
        self.checkpoint, self.replay = path, []

    def resume(self, checkpoint: str, state: dict) -> None:
        """Continue after a checkpoint: its weights and optimizer, its version, its data
        position, and (rl.kl_control adaptive) the controller's beta; a checkpoint written
        before kl_beta was saved starts the controller again from rl.beta."""
        self.learner.load(checkpoint)
        self.checkpoint, self.replay = checkpoint, []
        self.launched = state["next_batch_index"]
        if self.cfg.rl.kl_control == "adaptive":
            self.beta = float(state.get("kl_beta", self.cfg.rl.beta))
        self.publish(state["policy_version"])

    # -- recovery and weight sync --

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
                if not actor_died(err):
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
                if not (actor_died(err) or timed_out) or attempt == self.max_retries:
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
                        if not actor_died(err0):
                            raise
                        self.rebuild_learner(err0)
                for g in self.gens:
                    self.wait_alive(g)
                self.regroup = self.broadcast

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
        for old, beta in self.replay:  # each at the beta it was trained with
            self.learner.train(old, self.cfg.rl.loss_agg, beta)
        self.recoveries.append({"learner": True, "error": type(err).__name__, "replayed": len(self.replay),
                                "restore_s": time.perf_counter() - t0})
        self.regroup = self.broadcast  # the new rank 0 is not in the weight group yet

    def kill(self) -> None:
        for a in self.actors():
            ray.kill(a)
        release(self.tag)
        release(self.learner.tag, ["learner"])
