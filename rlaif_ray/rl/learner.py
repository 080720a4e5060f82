"""PolicyLearner: the RL update without Ray. Holds the policy (with an optional value head),
the frozen reference policy for the KL term and the optimizer; `step(rows)` is one update
of rl.algorithm (docs/method.md §3: REINFORCE by default; grpo and ppo run several optimizer
steps on the batch) on a batch of scored rollouts.

Runs on a bare CPU or CUDA machine. Under torch.distributed with more than one rank (the
actor `actors/learner.py` sets the group up) policy, reference, gradients and optimizer
state are sharded with FSDP2 (`fully_shard`: NCCL on GPU, gloo on CPU); every public method
is then a collective that all ranks call in the same order.

Precision: master weights and AdamW state are float32 always. With a bfloat16 compute dtype
(`model.dtype: auto` on CUDA) the forward and backward run in bf16, through FSDP's
MixedPrecisionPolicy (params all-gathered in bf16, gradients reduced in fp32) when sharded
and torch.autocast otherwise; the reference model is held in bf16. Log-softmax, losses and
the KL are computed in float32.
"""
from __future__ import annotations

import datetime
import json
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from rlaif_ray.engines import adapters, lm
from rlaif_ray.engines.devices import compute_dtype, dtype_name, enable_tf32
from rlaif_ray.engines.models import decoder_layers, load_model, load_tokenizer, read_model_weights
from rlaif_ray.remote_folder import StorageFolder, is_uri, materialize, staging_for, staging_root
from rlaif_ray.rl import algorithms as algo
from rlaif_ray.rl import losses as rl
from rlaif_ray.storage import PARTIAL, atomic_write_json, publish_dir, temp_path

# how long the other ranks wait for rank 0 to read a checkpoint (PolicyLearner._wait_for_rank0)
LOAD_WAIT = datetime.timedelta(hours=2)


class NonFiniteError(RuntimeError):
    """A non-finite loss or reward: nothing was applied."""


# AdamW's fused kernel (CUDA and CPU): one pass over each parameter's weights, gradient and
# moments, no temporaries. foreach allocates temporaries the size of every parameter at once
# (a model-sized spike at each step); the single-tensor loop makes about 8 passes
# (BENCHMARKS.md "AdamW kernel": 0.14 s fused against 0.50 s at 1 thread, 216 MB less peak)
ADAMW_KERNEL = dict(fused=True, foreach=False)


def _is_dtensor(t) -> bool:
    return hasattr(t, "full_tensor")


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered to its full value (a collective), or the tensor itself."""
    return t.full_tensor() if _is_dtensor(t) else t


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (possibly empty), or the tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


def loss_normalisers(response_token_ids: list[list[int]], reward_ok: list[bool]) -> tuple[int, int]:
    """(num_tokens, num_seqs) for `PolicyLearner.step` from the *whole* batch (every rank's
    rows): the usable rows' response tokens and the usable rows. Rows whose reward could not
    be read are out of the loss, so out of its denominators too (at least 1 each)."""
    ok = [bool(u) for u in reward_ok]
    return max(sum(len(t) for t, u in zip(response_token_ids, ok) if u), 1), max(sum(ok), 1)


def split_by_tokens(sizes: list[int], budget: int, count: int | None = None) -> list[list[int]]:
    """Indices of items of `sizes` tokens in micro-batches: dealt largest first to the lightest.
    `count` micro-batches (at most one per item), or with None the fewest whose every
    micro-batch of more than one item stays within `budget` (0: one micro-batch). Each lists
    its indices in order; [[]] for no items."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])

    def deal(k: int) -> list[list]:
        bins = [[0, []] for _ in range(k)]
        for i in order:
            b = min(bins, key=lambda x: x[0])
            b[0] += sizes[i]
            b[1].append(i)
        return bins

    if count is None:
        count = 1
        while budget and count < len(order) and any(t > budget and len(ix) > 1 for t, ix in deal(count)):
            count += 1
    return [sorted(ix) for _, ix in deal(max(1, min(count, len(order)))) if ix] or [[]]


def ranks_agree_count(planned: int, items: int, device) -> int:
    """How many micro-batches every rank of the default process group runs (FSDP's and DDP's
    forwards are collectives, so all run as many): the most any rank `planned`, at most one
    per item of the rank with the fewest `items`."""
    import torch.distributed as dist

    need = torch.tensor([planned, -items], device=device)
    dist.all_reduce(need, op=dist.ReduceOp.MAX)
    return min(int(need[0]), -int(need[1]))


def plan_micro_batches(rows: list[dict], budget: int, count: int | None = None) -> list[list[int]]:
    """Row indices of each micro-batch (split_by_tokens over prompt groups): a prompt's rows
    (its group baseline) never split, a group's size the tokens of its rows (prompt +
    response each); a group over the budget is a micro-batch of its own. Each micro-batch
    lists its rows in their order in `rows`."""
    groups: dict = {}
    for i, r in enumerate(rows):
        groups.setdefault(r["prompt_id"], []).append(i)
    members = list(groups.values())
    sizes = [sum(len(rows[i]["prompt_token_ids"]) + len(rows[i]["response_token_ids"]) for i in idx) for idx in members]
    return [sorted(i for g in part for i in members[g]) for part in split_by_tokens(sizes, budget, count)]


def split_mini_batches(group_ids: list, count: int, generator: torch.Generator | None = None) -> list[list[int]]:
    """Row indices of `count` mini-batches for grpo/ppo's optimizer steps: prompt groups
    shuffled (with `generator`) and dealt to the lightest, a prompt's rows together; with
    fewer groups than `count`, rows one by one. Each lists its rows in order; none is empty
    while there are at least `count` rows (the config checks it)."""
    groups: dict = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    units = list(groups.values()) if len(groups) >= count else [[i] for i in range(len(group_ids))]
    order = torch.randperm(len(units), generator=generator).tolist()
    bins: list[list[int]] = [[] for _ in range(min(count, len(units)) or 1)]
    for u in order:
        min(bins, key=len).extend(units[u])
    return [sorted(b) for b in bins]


def _decoder_layers(model) -> list:
    """The transformer blocks of a HF causal LM (its `_no_split_modules` classes): FSDP's units."""
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__}: cannot find its decoder layers to shard (no _no_split_modules)")
    return layers


def shard(module: torch.nn.Module, hf_model, mesh, param_dtype: torch.dtype | None) -> None:
    """FSDP2: each decoder layer its own unit (all-gathered just in time, freed after), the rest
    (embeddings, final norm, LM head, value head) in the root unit."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else \
        MixedPrecisionPolicy()
    for layer in _decoder_layers(hf_model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(module, mesh=mesh, mp_policy=mp)


class BaseModelScorer(lm.ResponseScorer):
    """The reference policy under model.lora: the policy's scorer run with its LoRA adapters
    disabled (PeftModel.disable_adapter), i.e. the frozen base model; no second copy of the
    weights. It runs through the policy's own module (the FSDP root when sharded, so its
    unshard hooks run) and returns no values."""

    def __init__(self, policy: lm.ResponseScorer, peft_model):
        torch.nn.Module.__init__(self)  # not ResponseScorer's: the policy's modules are not registered again
        self.__dict__["_policy"], self.__dict__["_peft"] = policy, peft_model

    @property
    def model(self):
        return self._policy.model

    def parameters(self, recurse: bool = True):
        return self._policy.parameters(recurse)

    def forward(self, *args, **kwargs):
        with self._peft.disable_adapter():
            logp, _ = self._policy(*args, **kwargs)
        return logp, None


class PolicyLearner:
    """`rl_cfg`: an RLConfig (or its dict). `dtype`: the compute precision (auto, float32,
    bfloat16). `shard`: None = FSDP when torch.distributed runs with more than one rank.
    `temperature`, `top_k`, `top_p`: the generators' sampling settings (generation.*): the
    policy's log-probs are those of the distribution the rollouts were sampled from
    (lm.sampled_logprobs), so the on-policy importance ratio is 1."""

    def __init__(self, model_name: str, rl_cfg, temperature: float, device: str = "cpu", dtype: str = "auto",
                 shard_model: bool | None = None, top_k: int = 0, top_p: float = 1.0, reference: bool = True,
                 store=None, lora=None):
        import torch.distributed as dist

        from rlaif_ray.config import RLConfig

        self.rl = RLConfig.model_validate(rl_cfg) if isinstance(rl_cfg, dict) else rl_cfg
        self.model_name, self.temperature = model_name, temperature
        # the policy: softmax(logits / T) cut to its top-k, then top-p set, renormalised (what
        # the generator sampled from). The reference: softmax(logits / T) in full, a fixed
        # distribution over every token, so KL(policy || reference) stays finite; cut to its
        # own top-k/top-p set it would give 0 to tokens the trained policy samples.
        self.sampling = dict(top_k=top_k, top_p=top_p)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.compute = compute_dtype(dtype, self.device)
        enable_tf32(self.device)
        up = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if up else (0, 1)
        self.sharded = (up and self.world > 1) if shard_model is None else shard_model
        if self.world > 1 and not self.sharded:
            raise ValueError("a learner group of more than one rank shards its model (FSDP); shard_model=False needs one")
        torch.manual_seed(self.rl.seed)
        # model.lora (a dict or LoraConfig; None: full fine-tuning): frozen base weights, LoRA
        # adapters trained; the reference is the base model (the adapters off), no second copy
        self.lora = adapters.as_dict(lora)
        self.peft = None  # the PeftModel around the policy's transformers model (model.lora)

        self._build_policy(self._load_lm("float32"))  # fp32 master weights
        if reference:
            self._load_reference()
        # unsharded bf16 compute: autocast (fp32 weights, bf16 matmuls); sharded: FSDP casts
        self.autocast = (not self.sharded) and self.compute != torch.float32
        self.opt = self._optimizer()
        self.steps = 0
        # the group's TCP store (torch.distributed): where ranks wait for rank 0's checkpoint read
        self.store, self._loads = store, 0

    def _build_policy(self, policy) -> None:
        """The policy (fp32 master weights) with its value head (rl.baseline value, or ppo),
        sharded with FSDP2 over the group, or on this rank's device."""
        if self.rl.gradient_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.disable_dropout(policy)  # train mode (checkpointing needs it), without dropout's noise
        if self.lora is not None:  # after disable_dropout: the adapters' own dropout is model.lora.dropout
            self.peft = adapters.wrap(policy, self.lora)  # injected in place: `policy` now holds the adapters
        value_head = None
        if self.rl.uses_value_head:
            # scalar value head on the policy trunk (a separate value model would be a second
            # policy-sized copy; sharing the trunk keeps small runs affordable)
            value_head = torch.nn.Linear(policy.config.hidden_size, 1)
            torch.nn.init.zeros_(value_head.weight)
            torch.nn.init.zeros_(value_head.bias)
        self.policy = lm.ResponseScorer(policy, value_head, value_detached=self.rl.value_trunk == "detached")
        # the value head's bias starts at the first batch's mean return (`_value_start_shift`)
        self.value_started = value_head is None
        self._ref = None  # the reference policy, loaded now or (reference=False) when first needed
        self.tied = bool(getattr(policy.config, "tie_word_embeddings", False))
        self.pad = policy.config.pad_token_id if policy.config.pad_token_id is not None else policy.config.eos_token_id
        self.mesh = None
        if self.sharded:
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(self.device.type, (self.world,))
            self._shard_from_rank0(self.policy, policy, self.compute if self.compute != torch.float32 else None)
        else:
            self.policy.to(self.device)
        self.policy.train()
        # the value head is its own param group with its own lr (rl.value_lr): at the policy's
        # lr it would barely move from its start
        self.value_params = list(self.policy.value_head.parameters()) if value_head is not None else []
        # the bias as the optimizer holds it (sharded: the DTensor, not FSDP's unsharded copy)
        self.value_bias = self.policy.value_head.bias if value_head is not None else None

    def _optimizer(self) -> torch.optim.AdamW:
        """AdamW over the trainable parameters: every policy weight, or with model.lora the
        adapters alone (the base is frozen); the value head in a group of its own."""
        head = {id(p) for p in self.value_params}
        groups = [{"params": [p for p in self.policy.parameters() if id(p) not in head and p.requires_grad],
                   "lr": self.rl.lr}]
        if self.value_params:
            groups.append({"params": self.value_params, "lr": self.rl.value_lr})
        return torch.optim.AdamW(groups, lr=self.rl.lr, weight_decay=self.rl.weight_decay, **ADAMW_KERNEL)

    def _load_reference(self) -> "lm.ResponseScorer":
        """The frozen reference policy; it only runs forward: held in the compute dtype (bf16
        on GPU). With `reference=False` (rl.reference: labeler, the batches carry its log-probs)
        it is loaded only if a batch comes without them: a policy-sized copy saved otherwise.
        Sharded, every rank loads it in the same step (a collective). With model.lora the
        reference is the policy itself with its adapters off (BaseModelScorer): nothing is loaded."""
        if self._ref is None and self.peft is not None:
            self._ref = BaseModelScorer(self.policy, self.peft)
        if self._ref is None:
            ref = lm.ResponseScorer(self._load_lm(dtype_name(self.compute)).requires_grad_(False))
            if self.sharded:
                self._shard_from_rank0(ref, ref.model, None)
            else:
                ref.to(self.device)
            self._ref = ref.eval()
        return self._ref

    def _load_lm(self, dtype: str):
        """The causal LM in `dtype`: read from its files on this process's CPU, or (sharded,
        ranks other than 0) built on the meta device, holding no memory until its shards are
        allocated and filled from rank 0 (_shard_from_rank0): one full copy per node group,
        not per rank (8 ranks of a 7B policy in fp32 would hold 8 x 28 GiB of host memory)."""
        if not self.sharded or self.rank == 0:
            return load_model(self.model_name, dtype)
        from transformers import AutoModelForCausalLM

        from rlaif_ray.engines.models import model_config, quiet_transformers

        quiet_transformers()
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(model_config(self.model_name), dtype=getattr(torch, dtype))

    def _shard_from_rank0(self, module: torch.nn.Module, hf_model, param_dtype: torch.dtype | None) -> None:
        """FSDP2 over the group (shard), each rank's shards filled from rank 0's full weights
        (broadcast), and every buffer (rotary tables, which no state dict holds) copied from
        rank 0: the other ranks built the model on the meta device (_load_lm)."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        full = module.state_dict() if self.rank == 0 else {}
        shard(module, hf_model, self.mesh, param_dtype)  # moves rank 0's shards (and buffers) to its device
        if self.rank != 0:
            module.to_empty(device=self.device)  # allocated, not initialised: filled below
        set_model_state_dict(module, full, options=self._options(broadcast_from_rank0=True, strict=True))
        del full
        for buf in module.buffers():
            dist.broadcast(buf, src=0)

    @property
    def ref(self) -> "lm.ResponseScorer":
        return self._load_reference()

    @property
    def reference_loaded(self) -> bool:
        return self._ref is not None

    # ---- the update --------------------------------------------------------------------

    def _amp(self):
        return torch.autocast(self.device.type, dtype=self.compute) if self.autocast else nullcontext()

    def step(self, rows: list[dict], num_tokens: int, num_seqs: int, beta: float | None = None) -> dict:
        """One update on this rank's rows (SCORED fields). Losses are normalised by the global
        batch (`num_tokens`, `num_seqs`: the usable tokens and rows of every rank's rows, as
        `loss_normalisers` counts them), so gradients summed over ranks and micro-batches
        (rl.micro_batch_tokens) are the one-pass gradient of the whole batch. Rows with
        `reward_ok` false stay out of the loss, the baselines and the metrics. `beta`: this
        step's KL weight in place of rl.beta (the adaptive KL controller's, rl.kl_control).
        Raises NonFiniteError (on every rank) before any change to the weights."""
        t0 = time.perf_counter()
        beta = self.rl.beta if beta is None else beta
        if self.rl.algorithm in ("grpo", "ppo"):
            return self._clipped_step(rows, beta, t0)
        parts = [[rows[i] for i in idx] for idx in self._micro_batches(rows)]
        # the value head starts at the whole batch's mean return (before any of its losses)
        shift = self._value_start_shift(sum(self._return_sums(p, beta) for p in parts)) \
            if self.value_bias is not None and not self.value_started else None
        self.opt.zero_grad(set_to_none=True)
        totals: dict = {}
        for part in parts:
            stats = self._accumulate(part, num_tokens, num_seqs, beta, shift)
            totals = {k: totals.get(k, 0) + v for k, v in stats.items()}
        grad_norm, value_grad_norm = self._apply(shift)
        self.steps += 1
        return {**totals, "grad_norm": float(grad_norm), "value_grad_norm": float(value_grad_norm),
                "rows": max(len(rows), 1), "micro_batches": len(parts), "step_s": time.perf_counter() - t0}

    def _micro_batches(self, rows: list[dict]) -> list[list[int]]:
        """plan_micro_batches for rl.micro_batch_tokens; sharded, every rank runs as many
        (FSDP's forward and backward are collectives): the most any rank needs, at most one
        per prompt group of the rank with the fewest."""
        budget = self.rl.micro_batch_tokens
        plan = plan_micro_batches(rows, budget)
        if self.world == 1 or not budget:
            return plan
        groups = len({r["prompt_id"] for r in rows})
        return plan_micro_batches(rows, budget, count=ranks_agree_count(len(plan), groups, self.device))

    def _return_sums(self, rows: list[dict], beta: float) -> torch.Tensor:
        """[sum of the returns over the usable tokens, their count] under the current policy
        (no gradient): what the value head's starting bias is computed from."""
        with torch.no_grad():
            b = self._batch(rows)
        return rl.return_sums(b["logp"], b["ref_logp"], b["reward"], b["mask"], b["usable"], beta,
                              self.rl.kl_estimator)

    def _accumulate(self, rows: list[dict], num_tokens: int, num_seqs: int, beta: float,
                    shift: torch.Tensor | None) -> dict:
        """One micro-batch: forward, its share of the loss, backward (gradients add up)."""
        cfg = self.rl
        b = self._batch(rows)
        if shift is not None:
            b["values"] = b["values"] + shift  # as if the bias had been there in this forward
        out = self._loss(b, rows, beta, num_tokens, num_seqs)
        self._check_finite(rows, out["loss"], b["reward"], b["usable"])
        # FSDP averages gradients over ranks; the loss is already a share of the global batch,
        # so scale it back to get their sum
        (out["loss"] * self.world if self.sharded else out["loss"]).backward()
        return self._step_stats(out, b, cfg.is_clip)

    def _loss(self, b: dict, rows: list[dict], beta: float, num_tokens: int, num_seqs: int) -> dict:
        """The micro-batch's loss under rl.algorithm (rl/losses.py, rl/algorithms.py)."""
        cfg, agg = self.rl, dict(how=self.rl.loss_agg, num_tokens=num_tokens, num_seqs=num_seqs)
        if cfg.algorithm == "online_dpo":
            pref = torch.tensor([r["raw_score"] for r in rows], dtype=torch.float32, device=self.device)
            return algo.online_dpo_surrogate(b["logp"], b["ref_logp"], b["mask"], pair_ids(rows), pref,
                                             usable=b["usable"], dpo_beta=cfg.dpo_beta, estimator=cfg.kl_estimator,
                                             num_seqs=num_seqs)
        if cfg.algorithm in ("grpo", "ppo"):
            # the targets fixed before the batch's first update (_grpo_advantages, _ppo_targets)
            if cfg.algorithm == "grpo":
                adv, targets = torch.tensor([r["_adv"] for r in rows], device=self.device), {}
            else:
                adv, ret, v_old = (lm.pad_rows([r[k] for r in rows], b["mask"].shape[1], self.device)
                                   for k in ("_adv", "_ret", "_v_old"))
                targets = dict(values=b["values"], values_old=v_old, returns=ret)
            return algo.clipped_surrogate(
                b["logp"], b["behaviour"], b["ref_logp"], adv, rl.usable_mask(b["mask"], b["usable"]),
                algorithm=cfg.algorithm, beta=beta, estimator=cfg.kl_estimator, clip_low=cfg.clip_low,
                clip_high=cfg.clip_high, value_clip=cfg.value_clip, value_coef=cfg.value_coef, **targets, **agg)
        baseline = "group_mean" if cfg.algorithm == "rloo" else cfg.baseline
        return rl.surrogate(b["logp"], b["ref_logp"], b["behaviour"], b["reward"], b["mask"], usable=b["usable"],
                            values=b["values"], group_ids=[r["prompt_id"] for r in rows], pair_ids=pair_ids(rows),
                            beta=beta, estimator=cfg.kl_estimator, baseline=baseline, is_clip=cfg.is_clip,
                            value_coef=cfg.value_coef, **agg)

    # ---- grpo and ppo: epochs of mini-batches over one batch ---------------------------

    def _clipped_step(self, rows: list[dict], beta: float, t0: float) -> dict:
        """rl.epochs passes over the batch, each rl.mini_batches optimizer steps; advantages
        (and ppo's value targets) are fixed before the first. The metrics are the first pass's
        (every row once), losses averaged over its mini-batches, grad norms over all steps."""
        rows, shift = self._ppo_targets(rows, beta) if self.rl.algorithm == "ppo" else \
            (self._grpo_advantages(rows), None)
        shuffle = torch.Generator().manual_seed(self.rl.seed * 1_000_003 + self.steps)
        totals: dict = {}
        norms, micro = [], 0
        for epoch in range(self.rl.epochs):
            for part in split_mini_batches([r["prompt_id"] for r in rows], self.rl.mini_batches, shuffle):
                part_rows = [rows[i] for i in part]
                n_tok, n_seq = self._normalisers(part_rows)
                self.opt.zero_grad(set_to_none=True)
                for idx in self._micro_batches(part_rows):
                    stats = self._accumulate([part_rows[i] for i in idx], n_tok, n_seq, beta, shift)
                    micro += 1
                    if epoch == 0:
                        totals = {k: totals.get(k, 0) + v for k, v in stats.items()}
                norms.append(self._apply(shift, keep_bias_grad=True))
                shift = None  # the first optimizer step moved the bias
        self.steps += 1
        m = self.rl.mini_batches
        totals.update({k: totals[k] / m for k in ("loss_sum", "pg_loss_sum", "kl_loss_sum", "value_loss_sum")})
        return {**totals, "grad_norm": sum(float(g) for g, _ in norms) / len(norms),
                "value_grad_norm": sum(float(v) for _, v in norms) / len(norms), "rows": max(len(rows), 1),
                "micro_batches": micro, "optimizer_steps": len(norms), "step_s": time.perf_counter() - t0}

    def _normalisers(self, rows: list[dict]) -> tuple[int, int]:
        """loss_normalisers of a mini-batch over every rank's share of it (a collective)."""
        if self.world == 1:
            return loss_normalisers([r["response_token_ids"] for r in rows], [r["reward_ok"] for r in rows])
        import torch.distributed as dist

        counts = torch.tensor([sum(len(r["response_token_ids"]) for r in rows if r["reward_ok"]),
                               sum(bool(r["reward_ok"]) for r in rows)], device=self.device)
        dist.all_reduce(counts)
        return max(int(counts[0]), 1), max(int(counts[1]), 1)

    def _grpo_advantages(self, rows: list[dict]) -> list[dict]:
        """Each row with `_adv`, its group-normalised reward (a prompt's rows are on one rank)."""
        usable = torch.tensor([bool(r["reward_ok"]) for r in rows])
        reward = rl.usable_reward(torch.tensor([r["reward"] for r in rows], dtype=torch.float32), usable)
        adv = algo.group_normalised_advantages(reward, [r["prompt_id"] for r in rows], usable,
                                               self.rl.grpo_scale_std)
        return [{**r, "_adv": float(a)} for r, a in zip(rows, adv.tolist())]

    def _ppo_targets(self, rows: list[dict], beta: float) -> tuple[list[dict], torch.Tensor | None]:
        """Each row with ppo's `_adv` (GAE, whitened over every rank's rows), `_ret` (the value
        targets) and `_v_old` (the values before this batch's updates), from one pass without
        gradients; and the value head's start (as rl.baseline value: its bias moves to the
        batch's mean return, added to the values until the first optimizer step moves it)."""
        plan = self._micro_batches(rows)
        parts = [[rows[i] for i in idx] for idx in plan]
        with torch.no_grad(), self._amp():
            batches = [self._batch(part) for part in parts]  # one forward: the start and the targets
        shift = None if self.value_started else self._value_start_shift(sum(
            rl.return_sums(b["logp"], b["ref_logp"], b["reward"], b["mask"], b["usable"], beta, self.rl.kl_estimator)
            for b in batches))
        out, moments = [], torch.zeros(3, dtype=torch.float64, device=self.device)
        for part, b in zip(parts, batches):
            if shift is not None:
                b["values"] = b["values"] + shift
            mask = rl.usable_mask(b["mask"], b["usable"])
            kl = rl.kl_per_token(b["logp"].float(), b["ref_logp"].float(), self.rl.kl_estimator) * mask
            rewards = algo.token_rewards(rl.usable_reward(b["reward"], b["usable"]), kl, mask, beta)
            adv, ret = algo.gae(rewards, b["values"].float() * mask, mask, self.rl.gamma, self.rl.gae_lambda)
            moments += algo.whiten_moments(adv, mask)
            out.append((part, adv, ret, b["values"].float(), mask))
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(moments)
        done = list(rows)
        for idx, (part, adv, ret, values, mask) in zip(plan, out):
            adv = algo.whiten(adv, mask, moments) if self.rl.whiten_advantages else adv
            for i, (k, r) in enumerate(zip(idx, part)):
                n = len(r["response_token_ids"])
                done[k] = {**r, "_adv": adv[i, :n].tolist(), "_ret": ret[i, :n].tolist(),
                           "_v_old": values[i, :n].tolist()}
        return done, shift

    def _batch(self, rows: list[dict]) -> dict:
        """The tensors of a step: the policy's log-probs (with the gradient) and values, the
        reference's (from the batch when a labeler computed them, else a forward here), the
        behaviour log-probs, rewards and which rows are usable."""
        dev = self.device
        prompts = [r["prompt_token_ids"] for r in rows]
        responses = [r["response_token_ids"] for r in rows]
        with self._amp():
            logp, mask, values = self._logprobs(self.policy, prompts, responses, **self.sampling)
            if rows and all(r.get("reference_logprobs") is not None for r in rows):
                # computed off the learner by the labelers while the batch waited (rl.reference)
                ref_logp = lm.pad_rows([r["reference_logprobs"] for r in rows], mask.shape[1], dev) * mask
            else:
                with torch.no_grad():
                    ref_logp, _, _ = self._logprobs(self.ref, prompts, responses)
        return {"logp": logp, "mask": mask, "values": values, "ref_logp": ref_logp,
                # rollouts whose label could not be read stay in the record but out of the loss
                "usable": torch.tensor([bool(r["reward_ok"]) for r in rows], device=dev),
                "behaviour": lm.pad_rows([r["behaviour_logprobs"] for r in rows], mask.shape[1], dev),
                "reward": torch.tensor([r["reward"] for r in rows], dtype=torch.float32, device=dev)}

    def _check_finite(self, rows: list[dict], loss: torch.Tensor, reward: torch.Tensor, usable: torch.Tensor) -> None:
        """NonFiniteError on every rank when any rank's loss, or a usable row's reward, is not
        finite (an unusable row's reward is never read)."""
        finite = bool(torch.isfinite(reward[usable]).all()) and bool(torch.isfinite(loss))
        if self._agree_failed(not finite):  # all stop together
            bad = [r["rollout_id"] for r, x, u in zip(rows, reward.tolist(), usable.tolist())
                   if u and (x != x or abs(x) == float("inf"))]
            raise NonFiniteError(f"non-finite loss or reward at learner rank {self.rank}; "
                                 f"non-finite rewards in rollouts {bad[:5]}; batch {rows[0].get('batch_index')}")

    def _apply(self, shift: torch.Tensor | None, keep_bias_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """After the backward passes: the value head's start, clip, AdamW step; returns the
        policy's and the value head's gradient norms. The start moves the bias here, after
        the backward, when FSDP holds no unsharded copy that would miss the move.
        `keep_bias_grad`: the loss's gradient on the bias is kept (ppo's targets are not the
        mean return, so it is not rounding)."""
        if shift is not None:  # the bias where this step's values put it (its gradient is the same)
            with torch.no_grad():
                _local(self.value_bias).add_(shift.to(self.value_bias.dtype))
                # at the mean return with zero weights its gradient is exactly 0: what rounding
                # leaves, AdamW's first step (g / (|g| + eps)) would blow up to a value_lr move
                if self.value_bias.grad is not None and not keep_bias_grad:
                    self.value_bias.grad.zero_()
            self.value_started = True
        # the value head's parameters are clipped on their own: their gradient (large while V is
        # far from the returns) must not scale the policy's update down. With a shared trunk
        # (rl.value_trunk: shared) the value loss's gradient on the trunk is part of the policy's
        # gradient and of its clipping; detached, the value loss reaches the head alone
        head = {id(p) for p in self.value_params}
        grad_norm = _full(torch.nn.utils.clip_grad_norm_([p for p in self.policy.parameters() if id(p) not in head],
                                                         self.rl.max_grad_norm))
        value_grad_norm = _full(torch.nn.utils.clip_grad_norm_(self.value_params, self.rl.max_grad_norm)) \
            if self.value_params else torch.zeros((), device=self.device)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)  # no model-sized gradients held between steps
        return grad_norm, value_grad_norm

    @staticmethod
    def _step_stats(out: dict, b: dict, is_clip: float) -> dict:
        """Sums over this rank's usable tokens and rows: the caller adds ranks' and divides."""
        mask, kl, ratio = out["mask"], out["kl"], out["ratio"]
        adv, z = out["advantages"] * mask, out["returns"] * mask
        return {
            "loss_sum": float(out["loss"].detach()), "pg_loss_sum": float(out["pg_loss"].detach()),
            "kl_loss_sum": float(out["kl_loss"].detach()), "value_loss_sum": float(out["value_loss"].detach()),
            "kl_sum": float(kl.sum()), "ratio_sum": float(ratio.sum()), "tokens": float(mask.sum()),
            # grpo, ppo: tokens where the PPO clip is active; else where the truncated IS ratio is cut
            "ratio_clipped": float(out["clipped"]) if "clipped" in out else
            float(((torch.exp(b["logp"].detach() - b["behaviour"]) > is_clip) & (mask > 0)).sum()),
            "adv_sum": float(adv.sum()), "adv_sq_sum": float(adv.pow(2).sum()),
            "return_sum": float(z.sum()), "return_sq_sum": float(z.pow(2).sum()),
            # usable_rows: the denominator of per-row means (the KL)
            "usable_rows": int(b["usable"].sum())}

    def _value_start_shift(self, sums: torch.Tensor) -> torch.Tensor | None:
        """The value head's start: its bias moves to the batch's mean return over the usable
        tokens (`sums` = [sum, count], added over ranks: a collective). Returns that move
        (None when no token is usable), which `step` adds to the bias after the backward."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(sums)
        before = _full(self.value_bias.detach()).float().reshape(())
        if float(sums[1]) == 0:
            return None
        return (sums[0] / sums[1] - before).detach()

    def logprobs(self, prompts: list[list[int]], responses: list[list[int]], reference: bool = False) -> list[list[float]]:
        """Per-token log-probs of responses under the policy (its sampling distribution: T,
        top-k, top-p) or the reference (at T), in the learner's compute precision: what
        `step` sees (parity checks)."""
        with torch.no_grad(), self._amp():
            logp, mask, _ = self._logprobs(self.ref if reference else self.policy, prompts, responses,
                                           **({} if reference else self.sampling))
        return [row[:len(r)] for row, r in zip(logp.float().cpu().tolist(), responses)]

    def _logprobs(self, scorer, prompts, responses, top_k: int = 0, top_p: float = 1.0):
        """Response log-probs at the sampling temperature: each distinct prompt computed once
        for all its samples when rl.shared_prompts is on and the model's attention takes a
        block mask (lm.grouped_logprobs), else one full sequence per sample."""
        return lm.shared_prompt_logprobs(scorer, prompts, responses, self.pad, self.temperature, top_k, top_p,
                                         share=self.rl.shared_prompts)

    def _wait_for_rank0(self, failed: bool) -> None:
        """The ranks other than 0 wait for rank 0's checkpoint read on the group's TCP store
        (`store`), not inside a collective: a 7B policy's checkpoint is ~90 GB, and NCCL's
        watchdog tears down a collective that waits past the group's timeout (gloo raises).
        The collectives that follow then find every rank ready."""
        if self.world == 1 or self.store is None:
            return
        key = f"rlaif-ray/load/{self._loads}"
        self._loads += 1
        if self.rank == 0:
            self.store.set(key, "failed" if failed else "read")
        else:
            self.store.wait([key], LOAD_WAIT)

    def _agree_failed(self, failed: bool) -> bool:
        """Whether any rank failed (every rank learns it, so all stop together)."""
        if self.world == 1:
            return failed
        import torch.distributed as dist

        flag = torch.tensor([float(failed)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # ---- weights out -------------------------------------------------------------------

    def named_weights(self):
        """(HF name, parameter) of the policy LM in a fixed order; a tied LM head is sent once.
        With model.lora the adapter alone: (PEFT name, parameter) of each LoRA tensor."""
        if self.peft is not None:
            return adapters.adapter_params(self.policy.model)
        return [(k, v) for k, v in self.policy.model.named_parameters() if not (self.tied and k == "lm_head.weight")]

    def weight_spec(self, dtype: str) -> list:
        """(name, full shape, dtype) of what `state_for_sync(dtype)` yields, in order."""
        return [(k, list(v.shape), dtype) for k, v in self.named_weights()]

    def state_for_sync(self, dtype: str):
        """Yields (name, full tensor in `dtype`, on this rank's device) one parameter at a time.
        Sharded: each is all-gathered (a collective: every rank iterates to the end)."""
        want = getattr(torch, dtype)
        for k, v in self.named_weights():
            # no_grad around the gather only, not the yield: a suspended generator inside the
            # context would leave grad mode off for its caller (two interleaved ones restore it wrongly)
            with torch.no_grad():
                t = _full(v.detach().to(want))  # cast the shard, then gather: half the bytes for bf16
            yield k, t

    # ---- checkpoints -------------------------------------------------------------------

    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)

    def save(self, path: str | Path, state: dict, hf_weights: bool = True) -> None:
        """A checkpoint folder at `path` (a path or a URI); every rank must call.

        One rank: full weights as safetensors that `from_pretrained` loads (with config,
        generation config and tokenizer), the value head and the full AdamW state keyed by
        parameter name in optimizer.safetensors, and `state` as trainer_state.json.

        A sharded (FSDP) learner writes `dcp/`: torch.distributed.checkpoint's files, each rank
        its own shard of weights and AdamW state (no gather, no full copy on rank 0; a
        checkpoint of N ranks resumes on M, DCP reshards), plus with `hf_weights` (the run's last
        checkpoint) the full weights as above, gathered once, for `from_pretrained` and eval.

        Crash-safe: everything goes into a hidden temp folder beside `path`; trainer_state.json
        (with every file's size) is written last, each file is fsynced, then the folder is
        renamed to `path` in one step. A crash or a full disk (ENOSPC) on the way leaves no
        `path` at all (the temp folder is removed), so `checkpoints/latest` never names a
        partial checkpoint. A URI `path` (a run on shared storage) is written to this node's
        staging folder the same way, uploaded with trainer_state.json last, and removed here:
        rank 0 may run on any node, the driver checks the upload before `latest` names it.

        model.lora, any number of ranks: `adapter/` in PEFT's format (adapter_config.json,
        adapter_model.safetensors) in place of the full weights, and the AdamW state of the
        adapters (and value head) alone; the trainable tensors are gathered to rank 0 (a few
        MB), the frozen base is never written (`hf_weights` does not apply)."""
        if self.sharded and self.peft is None:
            return self._save_sharded(path, state, hf_weights)
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        model_sd = get_model_state_dict(self.policy, options=self._options(ignore_frozen_params=self.peft is not None))
        optim_sd = get_optimizer_state_dict(self.policy, self.opt, options=self._options())
        if self.rank != 0:
            return
        uri = str(path) if is_uri(path) else None
        final = staging_for(uri) if uri else Path(path)
        final.parent.mkdir(parents=True, exist_ok=True)
        path = temp_path(final)
        try:
            path.mkdir()
            self._write_adapter(path / "adapter", model_sd) if self.peft is not None else self._write_hf(path, model_sd)
            tensors = {f"state.{fqn}.{k}": (v if torch.is_tensor(v) else torch.tensor(v, device="cpu")).contiguous()
                       for fqn, st in optim_sd["state"].items() for k, v in st.items()}
            tensors.update({k: v.contiguous() for k, v in model_sd.items() if k.startswith("value_head.")})
            save_file(tensors, str(path / "optimizer.safetensors"))
            meta = {"param_groups": optim_sd["param_groups"], "learner_steps": self.steps}
            atomic_write_json(path / "trainer_state.json", {**state, "optimizer_meta": meta, "files": _sizes(path)})
            publish_dir(path, final)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        if uri:
            try:
                StorageFolder(uri).delete()  # what an earlier try at this step left (a dead driver's)
                StorageFolder(uri, final).push(last="trainer_state.json")
            finally:
                shutil.rmtree(final, ignore_errors=True)

    def _write_hf(self, path: Path, model_sd: dict) -> None:
        """The policy as a transformers model folder (safetensors, config, tokenizer)."""
        from huggingface_hub import save_torch_state_dict

        weights = {k[len("model."):]: v for k, v in model_sd.items() if k.startswith("model.")}
        if self.tied:
            weights.pop("lm_head.weight", None)
        inner = self.policy.model
        inner.config.save_pretrained(path)
        if inner.generation_config is not None:
            inner.generation_config.save_pretrained(path)
        save_torch_state_dict(weights, path, metadata={"format": "pt"})
        load_tokenizer(self.model_name).save_pretrained(path)

    def _write_adapter(self, folder: Path, model_sd: dict) -> None:
        """model.lora: the adapter in PEFT's format (what `rlaif-ray export` merges and vLLM loads)."""
        tensors = {adapters.peft_name(k[len("model."):]): v for k, v in model_sd.items()
                   if k.startswith("model.") and adapters.is_adapter(k)}
        adapters.write_adapter(folder, tensors, self.lora, self.model_name)

    def _save_sharded(self, path, state: dict, hf_weights: bool) -> None:
        """`save` of an FSDP learner: each rank writes (and for a URI uploads) its own DCP shard
        into one temp folder (a shared file system, or each node's staging copy); after every
        rank is done, rank 0 adds the HF weights and trainer_state.json and publishes."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        uri = str(path) if is_uri(path) else None
        final = staging_for(uri) if uri else Path(path)
        tmp = final.parent / f".{final.name}{PARTIAL}dcp"  # one name for every rank (temp_path's is per process)
        if self.rank == 0 or uri:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "dcp").mkdir(parents=True, exist_ok=True)
        if uri and self.rank == 0:
            StorageFolder(uri).delete()  # what an earlier try at this step left (a dead driver's)
        self._agree_failed(False)  # the folder exists before any rank writes into it
        model_sd, optim_sd = get_state_dict(self.policy, self.opt)  # each rank's own shards
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
        full = get_model_state_dict(self.policy, options=self._options()) if hf_weights else None  # a gather
        if uri:  # each rank uploads what it wrote (rank 0: also DCP's .metadata)
            StorageFolder(uri, tmp).push("dcp", keep=lambda name: name.startswith(f"__{self.rank}_")
                                         or (self.rank == 0 and not name.startswith("__")))
        self._agree_failed(False)  # every shard is written (and uploaded)
        failed = None
        if self.rank == 0:
            try:
                self._finish_sharded(uri, tmp, final, full, state)
            except Exception as err:  # noqa: BLE001 - every rank must learn it, then rank 0 raises it
                failed = err
                shutil.rmtree(tmp, ignore_errors=True)
        if self._agree_failed(failed is not None):  # no rank waits for a rank 0 that gave up
            if uri:
                shutil.rmtree(tmp, ignore_errors=True)
            raise failed or RuntimeError(f"checkpoint {path}: learner rank 0 could not write it (see its log)")
        if uri:  # published: the staging copies can go
            shutil.rmtree(tmp, ignore_errors=True)

    def _finish_sharded(self, uri: str | None, tmp: Path, final: Path, full: dict | None, state: dict) -> None:
        """Rank 0's part of a sharded checkpoint once every shard is in: the HF weights (the
        run's last checkpoint), then trainer_state.json with every file's size, last."""
        if full is not None:
            self._write_hf(tmp, full)
        if uri:
            StorageFolder(uri, tmp).push(skip=("dcp",))
        files = StorageFolder(uri).files() if uri else _sizes(tmp)
        meta = {"format": "dcp", "learner_steps": self.steps, "ranks": self.world}
        atomic_write_json(tmp / "trainer_state.json", {**state, "optimizer_meta": meta, "files": files})
        if uri:
            StorageFolder(uri, tmp).push("trainer_state.json")
        else:
            publish_dir(tmp, final)

    def load(self, path: str | Path) -> None:
        """Resume from `save`'s folder: weights, value head and AdamW state, strictly (a
        missing or unexpected key is an error). A full checkpoint: rank 0 reads the files and
        broadcasts. A sharded one (dcp/): every rank reads its part (DCP reshards N ranks to M)."""
        if StorageFolder(path).exists("dcp/.metadata"):
            return self._load_sharded(path)
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        model_sd, optim_sd = {}, {}
        meta = json.loads(StorageFolder(path).read_bytes("trainer_state.json"))["optimizer_meta"]
        fetched = materialize(str(path), staging_root() / "checkpoints") if is_uri(path) and self.rank == 0 else None
        path = fetched or Path(path)
        if self.rank == 0:
            model_sd, optim_sd = self._read_checkpoint(path, meta)
        problem = ""
        if self.rank == 0:  # strict: a missing or unexpected tensor is an error, never a partial load
            problem = self._model_problem(path, model_sd) or self._optimizer_problem(path, optim_sd, model_sd)
        self._wait_for_rank0(bool(problem))
        if self._agree_failed(bool(problem)):
            raise RuntimeError(problem or f"checkpoint {path} does not match the model (see learner rank 0)")
        bcast = self.world > 1
        # model.lora: the trainable tensors alone (checked above), the frozen base as it was loaded
        set_model_state_dict(self.policy, model_sd, options=self._options(broadcast_from_rank0=bcast,
                                                                          strict=self.peft is None))
        set_optimizer_state_dict(self.policy, self.opt, optim_sd, options=self._options(broadcast_from_rank0=bcast))
        for group in self.opt.param_groups:  # the kernel is this process's choice, not the checkpoint's
            group.update(ADAMW_KERNEL)
        if fetched is not None:  # a 7B checkpoint is ~90 GB: a rebuild fetches it again
            shutil.rmtree(fetched, ignore_errors=True)
        self.steps = int(meta.get("learner_steps", 0))
        self.value_started = True  # the value head resumes where it was

    def _read_checkpoint(self, path: Path, meta: dict) -> tuple[dict, dict]:
        """Rank 0: (model state dict, optimizer state dict) of a checkpoint folder: its full
        weights, or with model.lora its adapter/ (PEFT names mapped back to the policy's), plus
        the value head and the AdamW state from optimizer.safetensors."""
        from safetensors.torch import load_file

        if self.peft is not None:
            if not (path / "adapter" / adapters.WEIGHTS_FILE).is_file():
                return {}, {"state": {}, "param_groups": meta.get("param_groups", [])}  # the strict check names it
            tensors, _ = adapters.read_adapter(path / "adapter")
            by_peft = {adapters.peft_name(n): n for n, p in self.policy.model.named_parameters() if adapters.is_adapter(n)}
            model_sd = {f"model.{by_peft.get(k, k)}": v for k, v in tensors.items()}
        else:
            weights = read_model_weights(path)
            if self.tied and "lm_head.weight" not in weights:
                weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
            model_sd = {f"model.{k}": v for k, v in weights.items()}
        tensors = load_file(str(path / "optimizer.safetensors"))
        model_sd.update({k: v for k, v in tensors.items() if k.startswith("value_head.")})
        state: dict = {}
        for key, v in tensors.items():
            if key.startswith("state."):
                fqn, name = key[len("state."):].rsplit(".", 1)
                state.setdefault(fqn, {})[name] = v
        return model_sd, {"state": state, "param_groups": meta["param_groups"]}

    def _model_problem(self, path: Path, model_sd: dict) -> str:
        """Why a checkpoint's tensors do not fit the policy exactly ("" when they do): a missing
        or unexpected name, or another shape (model.lora: another rank). The frozen base
        weights (model.lora) are not in a checkpoint."""
        mine = {k: tuple(v.shape) for k, v in self.policy.state_dict().items()}
        want = set(mine) - self._frozen_names()
        missing, unexpected = sorted(want - set(model_sd)), sorted(set(model_sd) - want)
        if missing or unexpected:
            return (f"checkpoint {path} does not match the model: missing {missing[:5]}"
                    f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
        wrong = [f"{k} {tuple(v.shape)} (the model's: {mine[k]})" for k, v in model_sd.items() if tuple(v.shape) != mine[k]]
        return f"checkpoint {path} does not match the model: shapes {wrong[:3]}" if wrong else ""

    def _frozen_names(self) -> set[str]:
        """The policy's parameters that do not train (model.lora: the base weights): never in a
        checkpoint, never loaded from one."""
        return {n for n, p in self.policy.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def _load_sharded(self, path) -> None:
        """Every rank loads its shards of weights and AdamW state from `path`/dcp (fetched to
        its node first when `path` is a URI: once per node, see materialize)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        meta = json.loads(StorageFolder(path).read_bytes("trainer_state.json"))["optimizer_meta"]
        local = materialize(str(path), staging_root() / "checkpoints") if is_uri(path) else Path(path)
        model_sd, optim_sd = get_state_dict(self.policy, self.opt)  # this rank's shards, to be filled
        try:
            dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(local / "dcp"))
        except Exception as err:  # noqa: BLE001 - DCP raises its own CheckpointException for a missing key
            raise RuntimeError(f"checkpoint {path} does not match the model ({str(err)[:300]})") from None
        set_state_dict(self.policy, self.opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
        for group in self.opt.param_groups:
            group.update(ADAMW_KERNEL)
        self.steps = int(meta.get("learner_steps", 0))
        self.value_started = True
        self._agree_failed(False)  # every rank has read: the fetched copy can go
        if is_uri(path):
            shutil.rmtree(local, ignore_errors=True)

    def _optimizer_problem(self, path: Path, optim_sd: dict, model_sd: dict) -> str:
        """The AdamW state must match this optimizer exactly (torch would load a partial state
        and start the missing parameters' moments from zero): the same param groups, each
        with the same parameters, every parameter with its full state of the right shape."""
        names = {id(p): n for n, p in self.policy.named_parameters()}
        mine = [[names.get(id(p), "?") for p in g["params"]] for g in self.opt.param_groups]
        theirs = [list(g.get("params", [])) for g in optim_sd["param_groups"]]
        where = f"checkpoint {path}: its optimizer state does not match this learner's optimizer"
        if len(mine) != len(theirs):
            return f"{where}: {len(theirs)} param group(s), this learner has {len(mine)} (rl.baseline / value head?)"
        for i, (a, b) in enumerate(zip(mine, theirs)):
            if set(a) != set(b):
                miss, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
                return f"{where}: param group {i} lacks {miss[:3]} and has unexpected {extra[:3]}"
        want_keys = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if self.opt.defaults.get("amsgrad") else set())
        for fqn in (n for g in mine for n in g):
            st = optim_sd["state"].get(fqn, {})
            if set(st) != want_keys:
                return f"{where}: the state of {fqn} has {sorted(st)}, expected {sorted(want_keys)}"
            full = model_sd.get(fqn)
            if full is not None and tuple(st["exp_avg"].shape) != tuple(full.shape):
                return f"{where}: exp_avg of {fqn} has shape {tuple(st['exp_avg'].shape)}, the parameter {tuple(full.shape)}"
        return ""


def pair_ids(rows: list[dict]) -> list[str]:
    """Each row's unit of the group baseline: a pairwise-rewarded row and its partner (samples
    2i and 2i+1 of one prompt occurrence, as the labeler pairs them) share one; any other row
    is alone."""
    out = []
    for r in rows:
        try:
            pairwise = json.loads(r.get("reward_meta") or "{}").get("mode") == "pairwise"
        except (ValueError, AttributeError):
            pairwise = False
        key = r["rollout_id"].rsplit(":", 1)[0]
        out.append(f"{key}:pair{r['sample_index'] // 2}" if pairwise else r["rollout_id"])
    return out


def _sizes(folder: Path) -> dict[str, int]:
    """{relative path: size} of every file under `folder`."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


