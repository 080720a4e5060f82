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

from actors.generator import generator_actor
from actors.labeler import Labeler
from actors.learner import LearnerGroup, LearnerWorker
from actors.metrics import RoleMetrics
from actors.ray_session import actor_died, actor_options, gather, learner_malloc_env, place, release
from actors.reward_model import RewardModel
from rlaif_ray import schemas
from rlaif_ray.config import Config, reference_on_labelers, shares_idle_cores
from rlaif_ray.core_share import SLOTS, create_table, remove_table, table_path
from rlaif_ray.data import prompt_batch
from rlaif_ray.devices import collective_backend, role_device
from rlaif_ray.rl import adaptive_kl_beta
from rlaif_ray.threads import local_cores
from rlaif_ray.weight_sync import WeightVersionError


class StalenessError(RuntimeError):
    """A batch sampled by a policy older than rl.max_staleness allows, after every retry."""


class WeightSyncTimeout(RuntimeError):
    pass


# ---- starting the actors ---------------------------------------------------------------

def _pool(cfg: Config, name: str, label: str, tag: str) -> list[dict]:
    role = getattr(cfg.pipeline, name)
    where = place(name, role, tag, cfg.pipeline.batch_timeout_s)
    return [actor_options(role, f"{label}-{i}@{tag}" if tag else f"{label}-{i}", where=where[i])
            for i in range(role.num_actors)]


def share_spec(cfg: Config, table: str | None, pool: str, i: int = 0) -> dict | None:
    """Actor i of `pool`'s place in the core-share table (pipeline.share_idle_cores): slots
    by pool (generators, labelers, learner ranks, then the judge); None when the table is off
    or the pool computes on GPUs."""
    p = cfg.pipeline
    role = p.labelers if pool == "judge" else getattr(p, pool)
    if table is None or role.num_gpus > 0:
        return None
    pools = ("generators", "labelers", "learner", "judge")
    counts = [p.generators.num_actors, p.labelers.num_actors, p.learner.num_actors, 1]
    base, slots = sum(counts[:pools.index(pool)]), sum(counts)
    if slots > SLOTS:
        raise ValueError(f"pipeline.share_idle_cores: {slots} actors on one node exceed the table's {SLOTS}; "
                         "set pipeline.share_idle_cores=false")
    return {"path": table, "cores": local_cores(cfg.ray.num_cpus), "slot": base + i, "slots": slots}


def generator_engine(cfg: Config) -> dict:
    """The generators' vLLM settings, sized to what they are given: no sequence longer than a
    capped prompt and its response, and (auto KV cache on CPU) one step's rollouts at once."""
    v = cfg.pipeline.generators.vllm.model_dump()
    v["max_model_len"] = v["max_model_len"] or cfg.task.max_prompt_tokens + cfg.generation.max_new_tokens
    v["kv_sequences"] = cfg.rl.prompts_per_step * cfg.rl.samples_per_prompt
    return v


def start_generators(cfg: Config, tag: str = "", share: str | None = None) -> list:
    g = cfg.pipeline.generators
    return [generator_actor().options(**o).remote(
        f"generator-{i}", cfg.model.name, cfg.model.dtype, cfg.generation.model_dump(), g.torch_threads,
        role_device(g.num_gpus), generator_engine(cfg), share_spec(cfg, share, "generators", i))
        for i, o in enumerate(_pool(cfg, "generators", "generator", tag))]


def start_labelers(cfg: Config, tag: str = "", share: str | None = None) -> list:
    """The reward pool: AI labelers, or (reward.source=rm) reward models in their place."""
    lab, m = cfg.pipeline.labelers, cfg.model
    if cfg.reward.source == "rm":
        return [ray.remote(RewardModel).options(**o).remote(
            f"reward-model-{i}", cfg.reward.rm_path, m.dtype, lab.torch_threads, role_device(lab.num_gpus),
            cfg.reward.batch_size, cfg.rm.max_tokens, share_spec(cfg, share, "labelers", i))
            for i, o in enumerate(_pool(cfg, "labelers", "reward-model", tag))]
    return [start_labeler(cfg, o, share_spec(cfg, share, "labelers", i))
            for i, o in enumerate(_pool(cfg, "labelers", "labeler", tag))]


def start_labeler(cfg: Config, options: dict, share: dict | None = None):
    """One Labeler actor with the config's reward section (also `eval`'s judge); `share`:
    its share_spec."""
    lab = cfg.pipeline.labelers
    return ray.remote(Labeler).options(**options).remote(
        options["name"].split("@")[0], cfg.reward.model_dump(), cfg.reward.model or cfg.model.name, cfg.model.dtype,
        lab.torch_threads, role_device(lab.num_gpus), lab.vllm.model_dump(), share)


def start_eval_labeler(cfg: Config, labelers: list, tag: str = "", share: str | None = None):
    """The AI labeler of the signal check and the win rate: the first labeler, or (when a
    reward model gives the rewards) a Labeler of its own, so the RM never grades itself."""
    if cfg.reward.source != "rm" or not (cfg.eval.win_rate or cfg.eval.signal_posts):
        return labelers[0]
    return start_labeler(cfg, actor_options(cfg.pipeline.labelers, f"judge-0@{tag}" if tag else "judge-0"),
                         share_spec(cfg, share, "judge"))


def start_learner(cfg: Config, tag: str = "", share: str | None = None) -> LearnerGroup:
    """The learner group; its ranks are not restarted one by one (a torch.distributed group
    cannot take a new member): Pipeline.rebuild_learner rebuilds the whole group instead."""
    role = cfg.pipeline.learner
    options = actor_options(role, "", restarts=False, env=learner_malloc_env() if cfg.rl.release_memory else {})
    options.pop("name")  # the group names its ranks learner-R@TAG
    return LearnerGroup(ray.remote(LearnerWorker), role.num_actors, options, tag,
                        place("learner", role, tag, cfg.pipeline.batch_timeout_s), model_name=cfg.model.name, dtype=cfg.model.dtype, rl_cfg=cfg.rl.model_dump(),
                        temperature=cfg.generation.temperature, top_k=cfg.generation.top_k,
                        top_p=cfg.generation.top_p, torch_threads=role.torch_threads, device=role_device(role.num_gpus),
                        reference=not reference_on_labelers(cfg), share=share_spec(cfg, share, "learner"))


def start_actors(cfg: Config, tag: str = "", share: str | None = None):
    """Every role in its own actors; `tag` makes the names unique per run (generator-0@RUN in
    the dashboard); `share`: the core-share table, if any. Call release(tag) after killing them."""
    return start_generators(cfg, tag, share), start_labelers(cfg, tag, share), start_learner(cfg, tag, share)


# ---- weight sync ---------------------------------------------------------------------------

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
    brings several) join a new weight-broadcast group (NCCL on GPU, gloo on CPU); formed at
    start and again whenever a member was replaced."""
    ranks = [i["weight_ranks"] for i in ray.get([g.info.remote() for g in gens])]
    first = [1 + sum(ranks[:i]) for i in range(len(gens))]
    backend, world = collective_backend(device), 1 + sum(ranks)
    (master, port), spec = ray.get([learner0.host_store.remote("weights", world, timeout),
                                    learner0.weight_spec.remote(dtype)])
    wait_named([learner0.join_weight_group.remote(master, port, world, backend, timeout)]
               + [g.join_weight_group.remote(master, port, first[i], world, backend, spec, timeout,
                                             int(bucket_mb * 2**20)) for i, g in enumerate(gens)],
               ["learner-0"] + [f"generator-{i}" for i in range(len(gens))], timeout, "forming the weight group")


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
        return self.pipe.labelers[i % len(self.pipe.labelers)].score.remote(rollouts, mode, ref_t)

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
        # pipeline.share_idle_cores: the table the actors of this node lend idle cores through
        self.share = create_table(table_path(tag)) if shares_idle_cores(cfg) else None
        try:
            self.gens, self.labelers, self.learner = start_actors(cfg, tag, self.share)
            self.eval_labeler = start_eval_labeler(cfg, self.labelers, tag, self.share)
            infos = gather([a.info.remote() for a in self.actors()], "loading models", cfg.run.progress, unit="actor")
        except BaseException:  # no Pipeline to kill(): the table goes now
            remove_table(self.share)
            raise
        self.weight_dtype = infos[0]["weight_dtype"]  # generators come first: the dtype they hold weights in
        self.version = 0  # the policy version the learner holds and the generators get next
        # the KL weight of the next step: rl.beta throughout, or (rl.kl_control: adaptive) where
        # the controller moved it after each step; checkpoints keep it (trainer_state.json kl_beta)
        self.beta = cfg.rl.beta
        # rl.reference: the labelers compute log pi_ref at the sampling temperature (None: the learner)
        self.reference_temperature = cfg.generation.temperature if reference_on_labelers(cfg) else None
        p = cfg.pipeline
        gpus = p.learner.num_gpus > 0 and p.generators.num_gpus > 0
        self.broadcast = p.weight_sync == "broadcast" or (p.weight_sync == "auto" and gpus)
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
        return self.gens + self.labelers + own + self.learner.workers

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
                                stats["usable_rows"])

    def save(self, path: str, step: int, sampler) -> None:
        state, index = self.resume_point(sampler)
        self.learner.save(path, {"step": step, "policy_version": self.version, "next_batch_index": index,
                                 "sampler": state, "kl_beta": self.beta})
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
        self.learner = start_learner(self.cfg, f"{self.tag}-r{len(self.recoveries) + 1}", self.share)
        if self.checkpoint:
            self.learner.load(self.checkpoint)
        for old, beta in self.replay:  # each at the beta it was trained with
            self.learner.train(old, self.cfg.rl.loss_agg, beta)
        self.recoveries.append({"learner": True, "error": type(err).__name__, "replayed": len(self.replay),
                                "restore_s": time.perf_counter() - t0})
        self.regroup = self.broadcast  # the new rank 0 is not in the weight group yet

    def kill(self) -> None:
        try:
            for a in self.actors():
                ray.kill(a)
            release(self.tag)
            release(self.learner.tag, ["learner"])
        finally:
            remove_table(self.share)
