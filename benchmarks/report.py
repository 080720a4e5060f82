"""Render BENCHMARKS.md from benchmarks/results/*.json (the last measurement of each).

    python -m benchmarks.report [--results DIR] [--out FILE]   (default: BENCHMARKS.md)
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"




def _load(name: str) -> dict | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _load_str(r: dict) -> str:
    b, a = r.get("load_before"), r.get("load_after")
    fmt = lambda x: "/".join(f"{v:.2f}" for v in x) if x else "?"  # noqa: E731
    return f"load average (1/5/15 min) before {fmt(b)}, after {fmt(a)}"


def _versions(r: dict) -> str:
    v = r.get("versions") or {}
    return ", ".join(f"{k} {x}" for k, x in v.items() if x)


def _setting(r: dict) -> str:
    """Cores, time, load and versions of one measurement."""
    vs = _versions(r)
    return f"{r['cpus']} cores, {r['time']}, {_load_str(r)}" + (f"; {vs}" if vs else "")


def _num(x: float | None, spec: str = ".3f") -> str:
    """A figure, or "-" where a result did not record it."""
    return "-" if x is None else format(x, spec)


def _overlap(ov: dict, title: str = "") -> list[str]:
    out = [f"## Pipeline overlap{title}", "", f"{ov['what']}; `{ov['config']}` with {' '.join(ov['overrides'])}; "
           f"{ov['pairs']} pairs, {_setting(ov)}.", "",
           "| max_staleness | completions/s (median) |", "|---|---|",
           f"| 0 (synchronous) | {ov['completions_per_s_staleness0']:.3f} |",
           f"| 1 (overlapped) | {ov['completions_per_s_staleness1']:.3f} |", "",
           f"Ratio 1 / 0: **{ov['ratio_1_over_0']:.3f}**" +
           (f" (per pair: {', '.join(f'{x:.2f}' for x in ov['pair_ratios'])})." if ov.get("pair_ratios") else "."), ""]
    a1 = ov.get("completions_per_s_after_step1")
    if a1:
        out[-1:] = ["", f"After step 1 (its end to the end of the last step; the overlapped first step fills the "
                    f"pipeline, the learner waiting for a first batch generated and labeled with nothing to overlap): "
                    f"{a1['0']:.3f} synchronous, {a1['1']:.3f} overlapped, ratio **{ov['ratio_after_step1']:.3f}**.", ""]
    runs = ov["runs"]
    if "busy_share" not in runs[0]:  # results written before the busy/idle shares were recorded
        names = sorted(runs[0]["stage_busy_s"])
        out += ["Stage busy time per run (seconds, from the actors' own timers) against the loop's wall time:", "",
                "| max_staleness | loop s | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        out += [f"| {r['max_staleness']} | {r['loop_s']:.1f} | " +
                " | ".join(f"{r['stage_busy_s'][k]:.1f}" for k in names) + " |" for r in runs]
        return out + [""]
    stages = sorted(runs[0]["stage_s"])
    out += ["Each run: the loop's wall time (first step to the end of the last; model loading and the final "
            "checkpoint write excluded), each stage's busy seconds from the actors' own timers with its busy "
            "share of the loop (idle = 1 - busy), the slowest stage, and the run's completions/s against the "
            "bound that stage sets (completions / its busy seconds):", "",
            "| max_staleness | loop s | step 1 s | completions/s | after step 1 | " +
            " | ".join(f"{s} s (busy)" for s in stages) +
            " | slowest | of its bound |", "|---|---|---|---|---|" + "---|" * len(stages) + "---|---|"]
    out += [f"| {r['max_staleness']} | {r['loop_s']:.1f} | {_num(r.get('step1_s'), '.1f')} | {r['completions_per_s']:.3f} | "
            f"{_num(r.get('completions_per_s_after_step1'))} | " +
            " | ".join(f"{r['stage_s'][s]:.1f} ({r['busy_share'][s]:.0%})" for s in stages) +
            f" | {r['slowest_stage']} | {r['of_bound']:.0%} |" for r in runs]
    shared = [r for r in runs if r.get("threads_mean")]
    if shared:  # pipeline.share_idle_cores was on in these runs
        out += ["", "Idle cores lent (`pipeline.share_idle_cores`) in the runs with max_staleness "
                f"{', '.join(str(k) for k in sorted({r['max_staleness'] for r in shared}))}; "
                "each actor's mean threads while it computed: " +
                "; ".join(", ".join(f"{k} {v:.2f}" for k, v in sorted(r["threads_mean"].items())) for r in shared) + "."]
    return out + [""]


def _overhead(oh: dict) -> list[str]:
    med, st = oh["completions_per_s"], oh["stage_s_per_step_median"]
    base = oh["plain_baseline"]  # the faster plain variant
    cols = ("generator", "labeler", "learner", "outside_stages")
    out = ["## Framework overhead (Ray pipeline vs plain Python)", "",
           f"{oh['what']}; `{oh['config']}` with {' '.join(oh['overrides'])}; {oh['pairs']} pairs, {_setting(oh)}.", "",
           "| variant | completions/s (median) | s per step | generator | labeler | learner | outside the stages |",
           "|---|---|---|---|---|---|---|"]
    out += [f"| {v}{' (baseline)' if v == base else ''} | {med[v]:.3f} | {st[v]['loop']:.2f} | "
            + " | ".join(f"{st[v][c]:.2f}" for c in cols) + " |" for v in med]
    pr = oh["pair_ratios_ray_over_plain"]
    noisy = len(pr) > 1 and max(pr) / min(pr) > 1.10
    met = ("met" if oh["meets_target"] else "**not met**") + (" by the medians, but not resolved: see below" if noisy else "")
    out += ["", f"Ray / {base} completions/s: **{oh['ratio_ray_over_plain']:.3f}**; Ray's loop time against {base}'s: "
            f"{oh['ray_slower_by']:+.1%} (target at most +5%: {met}). Per pair: "
            + ", ".join(f"{x:.3f}" for x in oh["pair_ratios_ray_over_plain"]) + ". " +
            "The baseline is the faster plain variant: the learner actor runs on the jemalloc Ray ships and the "
            "generator and labeler on glibc, which one process cannot do (an allocator is chosen at process start), "
            "so the plain loop runs once on glibc (the learner actor's glibc settings switched in before its step) "
            "and once wholly on jemalloc. " +
            f"Stage columns: seconds per step (medians), from the actors' busy timers "
            f"(Ray) or the same spans timed in the plain loop; *outside the stages* is the rest of the step (Ray: "
            f"weight sync through the object store, dispatch, Arrow; plain: the weight copy, "
            f"{st[base].get('weight_sync', 0):.3f} s). Same seeds, so the same samples: largest per-step difference "
            f"between Ray and a plain run in mean reward {oh['max_abs_diff']['reward_mean']:.1e}, in loss "
            f"{oh['max_abs_diff']['loss']:.1e}, in the KL weight beta (rl.kl_control, the plain loop steering it "
            f"as the driver does) {oh['max_abs_diff']['beta']:.1e}.", ""]
    if noisy:
        out += [f"The pairs disagree by more than the target itself (ratios {min(pr):.2f} to {max(pr):.2f}; load "
                f"average {_load_str(oh)[len('load average (1/5/15 min) '):]}): identical runs on this machine vary "
                "by more than the framework's cost, so this run cannot resolve 5%. Figures that vary "
                f"less: the time per step outside the stages' timers (Ray {st['ray']['outside_stages']:.2f} s, {base} "
                f"{st[base]['outside_stages']:.2f} s, of a {st['ray']['loop']:.1f} s step) and the CPU seconds below.",
                ""]
    if "cpu_s_per_step_median" in oh:
        c, k = oh["cpu_s_per_step_median"], oh["ray_cpu_s_per_step_by_process_median"]
        out += [f"CPU seconds per step (user + system, every process, the loop only; less sensitive to other load "
                f"on the machine than wall time): Ray {c['ray']:.2f} (" + ", ".join(f"{n} {v:.2f}" for n, v in k.items())
                + "), " + ", ".join(f"{v} {x:.2f}" for v, x in c.items() if v != "ray")
                + f": Ray / {base} **{oh['ratio_cpu_ray_over_plain']:.3f}**.", ""]
        plain = [r for r in oh.get("runs", []) if r["variant"] == base and "stage_cpu_s" in r]
        if plain:
            own = sum(v for n, v in k.items() if n == "driver" or n.startswith("ray"))
            pc = {n: statistics.median(r["stage_cpu_s"][n] / r["steps"] for r in plain) for n in ("generator", "labeler", "learner")}
            actor = {"generator": "RolloutGenerator", "labeler": "Labeler", "learner": "LearnerWorker"}
            out += ["Where the CPU goes, per step: Ray's own processes and the driver "
                    f"{own:.2f} CPU-s; each stage, Ray actor (its whole process, idle time included) against the "
                    f"{base} loop's span: " + ", ".join(f"{n} {k.get(actor[n], 0):.2f} vs {pc[n]:.2f}" for n in pc) +
                    f". Wall seconds of the learner stage: Ray {st['ray']['learner']:.2f}, {base} {st[base]['learner']:.2f}.", ""]
    if oh.get("note"):
        out += [oh["note"], ""]
    return out


def _scaling(sc: dict) -> list[str]:
    t, ck = sc["stage_times"], sc["check_g1_l1"]
    out = ["## Scaling model (predicted)", "",
           f"{sc['what']}: `{sc['config']}` ({sc['source_time']}, {sc['cpus']} cores, {_load_str(sc)}), "
           f"`rlaif_ray/run/scaling.py`. Per completion on one actor: generation t_g = {t['t_g']:.3f} s, labeling "
           f"t_l = {t['t_l']:.3f} s, learner t_t = {t['t_t']:.3f} s; t_s = {t['t_s']:.2f} s per step outside "
           f"the actors (weight sync, dispatch); n = {t['n']} completions per step.", "",
           f"`{sc['formula']}`.", "",
           "Predicted completions/s, each cell synchronous / max_staleness 1 / unbounded staleness, with the "
           "bottleneck stage of the unbounded pipeline:", ""]
    gs = sorted({r["generators"] for r in sc["table"]})
    ls = sorted({r["labelers"] for r in sc["table"]})
    cell = {(r["generators"], r["labelers"]): r for r in sc["table"]}
    out += ["| generators G \\ labelers L | " + " | ".join(str(x) for x in ls) + " |", "|---|" + "---|" * len(ls)]
    out += [f"| {g} | " + " | ".join(f"{cell[g, x]['staleness_0']:.2f} / {cell[g, x]['staleness_1']:.2f} / "
                                     f"{cell[g, x]['staleness_inf']:.2f} ({cell[g, x]['bottleneck']})" for x in ls) + " |"
            for g in gs]
    m, p = ck["measured_per_s"], ck["predicted_per_s"]
    out += ["", f"Check at G = L = 1: synchronous measured {m['0']:.3f} vs model {p['0']:.3f} (the model's "
            f"inputs come from these runs); max_staleness 1 measured {m['1']:.3f} vs model {p['1']:.3f} "
            f"(**{ck['measured_over_predicted']['1']:.0%}** of it)."]
    if "stage_s_per_completion_overlapped" in ck:
        o = ck["stage_s_per_completion_overlapped"]
        out[-1] += (f" The model assumes stages do not slow each other down; in the overlapped runs they share the "
                    f"cores (t_g {o['t_g']:.3f}, t_l {o['t_l']:.3f}, t_t {o['t_t']:.3f} s per completion), and "
                    f"with those times it predicts {ck['predicted_with_overlapped_stage_times_per_s']:.3f}.")
    out.append("")
    out += ["To check on a cluster: run `benchmarks.overlap` there with pools of 1, `benchmarks.scaling`, then "
            "`benchmarks.overlap --set pipeline.generators.num_actors=G --set pipeline.labelers.num_actors=L` "
            "(rl.prompts_per_step >= G) and compare with the cell.", ""]
    return out


def _memory(mem: dict) -> list[str]:
    out = ["## Peak memory (quickstart)", "",
           f"`{mem['command']}` under `benchmarks.peak_memory` (every process of the run's tree sampled each "
           f"second): wall {mem['wall_s']:.0f} s, peak sum of PSS **{mem['peak_pss_sum_gib']:.2f} GiB** "
           f"(shared pages split between processes), sum of RSS {mem['peak_rss_sum_gib']:.2f} GiB"
           + (f"; {_setting(mem)}" if "time" in mem and "cpus" in mem else "") + "."]
    procs = mem.get("processes_at_peak_pss_mib") or mem.get("processes") or []
    if procs:
        at = f" ({mem['peak_pss_at_s']:.0f} s into the run)" if "peak_pss_at_s" in mem else ""
        out += ["", f"Largest processes at peak PSS{at}, MiB:", "", "| process | PSS | RSS |", "|---|---|---|"]
        out += [f"| `{p['name'][:60]}` | {p['pss']:.0f} | {p['rss']:.0f} |"
                for p in sorted(procs, key=lambda p: -p["pss"])[:8]]
    return out + [""]


def render() -> str:
    out = ["# Benchmarks", "",
           "Generated by `make bench` (`benchmarks/report.py`) from `benchmarks/results/*.json`: each figure is",
           "the last measurement, taken in one process run with the variants alternated. Timings live here, never in tests.",
           "", f"Machine: {platform.machine()}, Python {platform.python_version()}; see each section for cores, load and time. "
           "The project's 2-core machines differ between sessions: the sections measured up to 2026-12-01 08:48 UTC "
           "ran on CPUs with AVX-512 as far as recorded, the later ones on an AVX2 AMD EPYC, where the same learner "
           "step took 18-20 s against 12 s. Compare figures within a section; the later sections name their CPU.", ""]
    sig = _load("signal")
    if sig:
        out += ["## Judge signal (scorer variants)", "", sig["what"] + f"; model {sig['model']}, {sig['data']}.", "",
                "| scorer | posts | reference ranked higher | 95% CI |", "|---|---|---|---|"]
        out += [f"| `{r['scorer']}` | {r['n']} | {r['reference_wins']:.1%} | {r['ci95'][0]:.1%}-{r['ci95'][1]:.1%} |"
                for r in sig["results"]]
        out.append("")
    ov = _load("overlap")
    if ov:
        out += _overlap(ov)
    sc = _load("scaling")
    if sc:
        out += _scaling(sc)
    oh = _load("overhead")
    if oh:
        out += _overhead(oh)
    out += _trl_compare(_load("trl_compare"))
    out += _quickstart_speed(_load("quickstart_speed"))
    for gen, title in ((_load("generation"), ""),):
        if not gen:
            continue
        out += [f"## Generation throughput and weight updates{title}", "",
                f"{gen['what']}; {gen['model']}, batch {gen['batch']} x {gen['new_tokens']} new tokens, "
                f"{gen['rounds']} rounds, {_setting(gen)}.", "",
                "| variant | weights | tokens/s (median) |", "|---|---|---|"]
        dt = gen.get("weight_dtype", {})  # the direct model.generate holds float32
        out += [f"| {k} | {dt.get(k, 'float32' if k in ('hf', 'direct') else '-')} | {v:.1f} |"
                for k, v in gen["tokens_per_s"].items()]
        auto = gen.get("auto_variant")
        if gen.get("cpu_bf16"):
            flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in gen["cpu_bf16"].items())
            out.append(f"\nThe CPU's bf16 instructions: {flags}. " + (
                "`vllm-bf16` and `vllm-fp32` are the vLLM generator actor with `pipeline.generators.vllm.dtype` "
                "set; left at auto, `rlaif_ray.engines.devices.vllm_dtype` picks bf16 only with AVX-512, AMX or Arm BF16: "
                f"here **{auto}**." if auto else
                "`vllm` holds its weights in the dtype `rlaif_ray.engines.devices.vllm_dtype` picks for this CPU (bf16 only "
                "with AVX-512, AMX or Arm BF16); `vllm-bf16` is the same actor asked for bf16."))
        for key, label in (("ratio_vllm_over_hf", f"vllm actor in the dtype a run gets here ({auto}) / hf actor"
                            if auto else "vllm actor / hf actor"),
                           ("ratio_auto_dtype_over_other", "vllm actor in that dtype / in the other dtype"),
                           ("ratio_vllm_over_vllm_bf16", "vllm actor / vllm-bf16 actor"),
                           ("ratio_hf_actor_over_direct", "hf actor / direct model.generate")):
            if key in gen:
                out.append(f"\n{label}: **{gen[key]:.2f}**")
        if gen.get("target"):
            out.append(f"\nTarget: {gen['target']}.")
        out += ["", "| actor | weight install s | set_weights + install, wall s |", "|---|---|---|"]
        out += [f"| {k} | {v['install_s']:.2f} | {v['set_weights_and_install_wall_s']:.2f} |"
                for k, v in gen["weight_update"].items()]
        out.append("")
    for lab in (x for x in (_load("labeling"), _load("labeling_2shot")) if x):
        out += ["## Pairwise labeling throughput", "",
                f"{lab['what']}; {lab['model']}, {lab['pairs']} {lab['data']} pairs ({lab['shots']}-shot, median context "
                f"{lab['context_tokens_median']:.0f} tokens), batches of {lab['batch_pairs']} pairs, "
                f"{lab['torch_threads']} torch thread(s), {lab['rounds']} rounds, {_setting(lab)}.", "", "| variant | debiased labels/s (median) |", "|---|---|"]
        out += [f"| {k} | {v:.3f} |" for k, v in lab["pairs_per_s"].items()]
        out += ["", f"batched / single: **{lab['ratio_batched_over_single']:.2f}**; prefix_shared / single: "
                f"**{lab['ratio_prefix_shared_over_single']:.2f}**; prefix_shared / batched: "
                f"**{lab['ratio_prefix_shared_over_batched']:.2f}**. Largest difference in p_a between the variants: "
                f"{lab['max_abs_diff_p_a']:.1e}.", ""]
        if lab["shots"] == 0:
            out += ["On these 2 CPU cores a padded batch is slower per sequence than single rows (the forward is "
                    "compute-bound; padding is wasted work), so batching alone does not pay here; running shared "
                    "prefixes once does. On a GPU, where a batch's rows run in parallel, the padded batch should win; "
                    "that is why `reward.prefix_sharing: auto` turns sharing off there (not measured: no GPU here).", ""]
    grids = [g for g in (_load("labeler_grid"), _load("labeler_grid_cot"), _load("labeler_grid_cot300")) if g]
    if grids:
        out += ["## AI-labeler alignment with human labels (`eval-labeler`)", "",
                "Alignment: argmax of the debiased AI preference against the human label (0.5 counts half), with "
                "the 95% Wilson interval. *1 order*: the same from the first order alone. *same slot*: pairs where "
                "the same slot wins in both orders; *1st*: of those, the share where it is slot 1 (in the final, "
                "inverted-for-harmless preference).", ""]
        for g in grids:
            out += [f"{g['note']}", "",
                    "| data | prompt | n | alignment | 95% CI | 1 order | same slot | 1st | s |",
                    "|---|---|---|---|---|---|---|---|---|"]
            out += [f"| {r['data']} | `{r['variant']}` | {r['n']} | {r['alignment']:.1%} | "
                    f"{r['ci95'][0]:.1%}-{r['ci95'][1]:.1%} | {r['single_order_alignment']:.1%} | "
                    f"{r['same_position_share']:.1%} | {r['of_which_first_slot']:.1%} | {r['wall_s']:.0f} |"
                    for r in g["rows"]]
            out.append("")
    mem = _load("memory")
    if mem:
        out += _memory(mem)
    demo = _load("demo")
    if demo:
        out += ["## Quickstart (`make demo`)", "", f"{demo['note']}", "",
                "| figure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in demo["figures"].items()] + [""]
    wr = _load("quickstart_winrate")
    if wr:
        out += ["## Quickstart: did it learn? (held-out win rate against the initial policy)", "", wr["note"], "",
                "| judge | n | win rate | 95% CI | length-controlled | 95% CI | mean chars final / initial |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {r['judge']} | {r['n']} | {r['win_rate']:.1%} | {r['ci95'][0]:.1%}-{r['ci95'][1]:.1%} | "
                f"{r['length_controlled']:.1%} | {r['lc_ci95'][0]:.1%}-{r['lc_ci95'][1]:.1%} | "
                f"{r['chars'][0]:.0f} / {r['chars'][1]:.0f} |" for r in wr["rows"]]
        out.append("")
    rma = _load("rm_accuracy")
    if rma:
        out += ["## Reward-model accuracy: AI labels against human labels (paper Table 5, tiny scale)", "",
                f"`python -m benchmarks.rm_accuracy --config {rma['config']}`, {rma['measured_at']}: "
                f"{rma['pairs_usable']} of {rma['pairs_labeled']} training pairs got a usable AI label from "
                f"{rma['labeler']} ({rma['pairwise']['preamble']} preamble, {rma['pairwise']['shots']}-shot, "
                f"CoT {rma['pairwise']['cot']}); that label agrees with the human one on "
                f"{rma['ai_label_alignment_on_train_pairs']:.1%} of them. Both RMs train on those same pairs "
                f"(init {rma['rm_settings']['init'] or 'model.name'}, {rma['rm_settings']['epochs']} epochs, lr "
                f"{rma['rm_settings']['lr']}, batch {rma['rm_settings']['batch_size']}, max {rma['rm_settings']['max_tokens']} "
                f"tokens) and are scored on the same held-out human-labelled pairs. {rma.get('note', '')}", "",
                "| RM trained on | pairs | held-out pairs | accuracy by epoch (0 = before training) | wall s |",
                "|---|---|---|---|---|"]
        out += [f"| {k} labels | {v['pairs']} | {v['heldout_pairs']} | "
                f"{' -> '.join(f'{a:.1%}' for a in v['accuracy_by_epoch'])} | {v['wall_s']:.0f} |"
                for k, v in rma["rm"].items()]
        out.append("")
    out += _weight_update(_load("weight_update"))
    out += _lora(_load("lora"))
    out += _gpu(_load("gpu_check"))
    out += _endpoint_load(_load("endpoint_load"))
    out += _judge_concurrency(_load("judge_concurrency"))
    out += _value_baseline(_load("value_baseline"))
    out += _settings(_load("settings"))
    history = ROOT / "benchmarks" / "history.md"  # the one-off studies' figures, kept as they were
    if history.is_file():
        out += ["## " + history.read_text().lstrip("# ")]
    return "\n".join(out)


def _trl_compare(tc: dict | None, title: str = "") -> list[str]:
    """results/trl_compare.json (benchmarks/trl_compare.py): rlaif-ray against TRL's GRPOTrainer.
    `title`: added to the heading (an earlier run on another CPU, kept beside the latest)."""
    if not tc:
        return []
    s, med, ratio = tc["settings"], tc["medians"], tc.get("ratios_over_trl", {})
    ta = s.get("trl_args") or {}
    out = [f"## rlaif-ray vs TRL (`python -m benchmarks.trl_compare`){title}", "",
           f"{tc['what']}: {tc['rounds']} round(s) of {', '.join(tc['order'])}, each run in its own process tree under "
           f"the memory sampler (every second); {_setting(tc)}.", "",
           f"The same on both sides: model {s['model']}; {s['prompts_per_step']} prompts x {s['samples_per_prompt']} "
           f"samples = {s['prompts_per_step'] * s['samples_per_prompt']} completions a step, up to "
           f"{s['max_new_tokens']} new tokens at temperature {s['temperature']}; lr {s['lr']:g}, beta {s['beta']}, "
           f"{s['steps']} steps, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, seed "
           f"{s['seed']}; the d-RLAIF 1-10 reward (`{s['scorer']}`) read from a frozen copy of the same model"
           + (", with rlaif-ray's judge code on both sides" if tc.get("trl_judge", "rlaif") == "rlaif" else
              "; TRL's reward function a plain padded forward of the judge") + f". Prompts: rlaif-ray's own (task.max_prompt_tokens="
           f"{s['max_prompt_tokens']}, on_long_prompt={s['on_long_prompt']}; mean {_num(s.get('prompt_tokens_mean'), '.0f')} "
           f"tokens) in its sampler's order, handed to TRL as the same chat strings (same token ids after TRL's "
           f"tokenization: {s.get('trl_prompts_same_token_ids', '?')}). TRL: one process, {s['trl_torch_threads']} "
           f"torch threads, loss `{ta.get('loss_type', '?')}`, scale_rewards `{ta.get('scale_rewards', '?')}`, lr "
           f"schedule `{ta.get('lr_scheduler_type', '?')}`, optimizer `{ta.get('optim', '?')}`. Timed: {tc['timed']}.", "",
           "| system | completions/s (median) | after step 1 | peak memory, sum of PSS (GiB) | CPU-s per completion | "
           "completions/s / TRL's | memory / TRL's | CPU-s / TRL's |", "|---|---|---|---|---|---|---|---|"]
    bold = lambda r, k: f"**{r[k]:.2f}**" if k in r else "-"  # noqa: E731
    for name in tc["order"]:
        m, r = med[name], ratio.get(name, {})
        out.append(f"| {tc['systems'][name]} | {_num(m['completions_per_s'])} | {_num(m['completions_per_s_after_step1'])} "
                   f"| {_num(m['peak_pss_gib'], '.2f')} | {_num(m.get('cpu_s_per_completion'), '.1f')} "
                   f"| {bold(r, 'completions_per_s')} | {bold(r, 'peak_pss_gib')} | {bold(r, 'cpu_s_per_completion')} |")
    out += ["", "CPU-s per completion: user + system CPU seconds of every process of the run over the same timed "
            "window, per completion: less sensitive than wall time to other work sharing the cores."]
    ab = tc.get("after_over_before") or {}
    if ab:
        out += ["", f"This checkout against the code at {tc['before']} (the same systems, alternated in this run), "
                "completions/s and memory: " + "; ".join(
                    f"{name} **{x['completions_per_s']:.3f}x** at {x['peak_pss_gib']:.2f}x the memory"
                    for name, x in ab.items()) + "."]
    pr = tc.get("per_round_ratios_over_trl") or {}
    if pr:
        out += ["", "Per round, rlaif-ray / TRL (completions/s, memory): " + "; ".join(
            f"{name} " + ", ".join(f"{x['completions_per_s']:.2f} / {x['peak_pss_gib']:.2f}" for x in xs)
            for name, xs in pr.items()) + "."]
    out += ["", "Each run: the timed loop, the peak sum of PSS, and the machine's 1-minute load average before the run "
            "and while it ran (mean, max; the run's own processes count in it):", "",
            "| round | system | loop s | completions/s | CPU-s per completion | peak PSS GiB | load before "
            "| load during (mean, max) |", "|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['round']} | {r['system']} | {r['loop_s']:.1f} | {r['completions_per_s']:.3f} "
            f"| {_num(r.get('cpu_s_per_completion'), '.1f')} | {r['peak_pss_gib']:.2f} | {r['load_before'][0]:.2f} "
            f"| {_num(r['load1_during_mean'], '.2f')}, {_num(r['load1_during_max'], '.2f')} |" for r in tc["runs"]]
    out += [""] + [f"- {n}" for n in tc.get("notes", [])]
    return out + [""]


def _quickstart_speed(qs: dict | None) -> list[str]:
    """results/quickstart_speed.json (benchmarks/quickstart_speed.py): the quickstart's loop
    before and after issue 22's work."""
    if not qs:
        return []
    med, ratio, first = qs["medians"], qs["ratios_over_before"], qs["first_step_reward"]
    out = ["## Quickstart loop, before and after (`python -m benchmarks.quickstart_speed`)", "",
           f"{qs['what']}: {qs['rounds']} round(s) of {qs['steps']} steps each, {', '.join(qs['variants'])} one after "
           f"another, each under the memory sampler; {_setting(qs)}. Overrides on every run: "
           f"{' '.join(qs['overrides'])}. Timed: the loop (metrics.jsonl's elapsed_s at the last step).", "",
           "| variant | what runs | completions/s (median) | after step 1 | peak PSS GiB | CPU-s per completion "
           "| completions/s / before | after step 1 / before | first-step mean reward |",
           "|---|---|---|---|---|---|---|---|---|"]
    b1 = med["before"]["completions_per_s_after_step1"]
    for v, label in qs["variants"].items():
        m, r = med[v], ratio.get(v, {})
        a1 = m["completions_per_s_after_step1"]
        out.append(f"| {v} | {label} | {m['completions_per_s']:.3f} | {'-' if a1 is None else f'{a1:.3f}'} "
                   f"| {m['peak_pss_gib']:.2f} | {m['cpu_s_per_completion']:.1f} "
                   f"| {'**%.2f**' % r['completions_per_s'] if r else '-'} "
                   f"| {'%.2f' % (a1 / b1) if r and a1 and b1 else '-'} | {', '.join(f'{x:+.4f}' for x in first[v])} |")
    out += ["", f"First-step mean reward identical in every run: **{'yes' if qs['first_step_identical'] else 'no'}** "
            "(same prompts, samples and judge: the changes compute the same thing)."]
    return out + [""]


def _weight_update(wu: dict | None) -> list[str]:
    """benchmarks/weight_update.py: one policy update per receiver, broadcast buckets vs the object store."""
    if not wu:
        return []
    out = ["## Weight updates: learner -> generators (`python -m benchmarks.weight_update`)", "",
           f"{wu['what']}; model {wu['model']}; {_setting(wu)}. `extra MB`: the receiver's peak resident memory "
           "during the update minus before it (sampled every 2 ms). On the object-store path the receiver also "
           "holds the staged payload (a model copy in its dtype) from its arrival until the next batch installs "
           "it: `staged MB`.", "",
           "| receiver | dtype | path | bucket MB | wall s | install s | extra MB | staged MB |",
           "|---|---|---|---|---|---|---|---|"]
    for r in wu["summary"]:
        out.append(f"| {r['receiver']} | {r['dtype']} | {r['path']} | {r['bucket_mb'] or '-'} | {r['wall_s']:.2f} | "
                   f"{r['install_s']:.2f} | {r['extra_mb']:.0f} | "
                   f"{'-' if r['staged_payload_mb'] is None else round(r['staged_payload_mb'])} |")
    return out + [""]


def _lora(lo: dict | None) -> list[str]:
    """results/lora.json (benchmarks/lora.py): LoRA against full fine-tuning on the quickstart."""
    if not lo:
        return []
    m = lo.get("machine") or {}
    load = m.get("note") or f"load average {m.get('load_avg_before')} at the start"
    out = ["## LoRA against full fine-tuning (`python -m benchmarks.lora`)", "",
           f"Measured {lo.get('time', '(time not recorded)')} on {m.get('cpus', '?')} cores ({load}). "
           f"`{lo['config']}` with {', '.join(f'`{s}`' for s in lo['sets'])}, one run per mode in turn (same seed); "
           "the learner's peak is the `ray::LearnerWorker` process sampled every 0.5 s; the held-out reward is the "
           f"frozen judge's, before -> after with its paired 95% CI. One update: LoRA sends {lo['bytes_ratio']:.2%} "
           f"of full fine-tuning's bytes (target <= 5%); the learner's peak RSS is {lo['learner_peak_ratio']:.2f}x "
           "(target <= 0.6x).", "",
           "| mode | settings | bytes per update | learner peak RSS / USS (MiB) | held-out reward before -> after "
           "(change +- CI) | win rate vs initial (95% CI); hacking verdict | independent measures (change) | wall s |",
           "|---|---|---|---|---|---|---|---|"]
    for mode, m in lo["modes"].items():
        hr = m.get("heldout_reward") or {}
        held = (f"{hr['before']:+.4f} -> {hr['after']:+.4f} ({hr['change']:+.4f} +- {hr['ci95_halfwidth']:.4f})"
                if hr else "-")
        ind = ", ".join(f"{k} {v['change']:+.3f}" for k, v in (m.get("independent") or {}).items()) or "-"
        wr = m.get("win_rate")
        win = (f"{wr['win_rate']:.1%} ({wr['ci95'][0]:.1%}-{wr['ci95'][1]:.1%})" if wr else "-") + \
            ("; suspected" if m.get("hacking") else "; not suspected" if m.get("hacking") is False else "")
        out.append(f"| {mode} | {' '.join(m['sets']) or '-'} | {m['weight_update_bytes']:,} | "
                   f"{m['learner_peak_rss_mib']} / {m['learner_peak_uss_mib']} | {held} | {win} | {ind} | "
                   f"{m['wall_s']:.0f} |")
    return out + [""]


def _gpu(gc: dict | None) -> list[str]:
    """`make gpu-check` on a lent GPU (results/gpu_check.json: its JSON line plus `machine`)."""
    out = ["## GPU (`make gpu-check`)", ""]
    if not gc:
        return out + ["No GPU run recorded: no session of this project has been lent a GPU machine yet, so the "
                      "CUDA, bf16-on-GPU and NCCL paths are unverified on hardware. `make gpu-check DEVICE=cpu` "
                      "runs the same script in the test suite (fp32 with Ray and vLLM, and bf16 mixed precision "
                      "on CPU).", ""]
    out += [f"{gc.get('machine', gc.get('name'))}; torch {gc['torch']}, transformers {gc['transformers']}, "
            f"Python {gc['python']}; model {gc['model']}; {gc.get('measured_at', '')}. Overall: "
            f"{'passed' if gc['ok'] else 'FAILED'} in {gc['wall_s']} s.", "", "| part | result | figures |", "|---|---|---|"]
    for name, part in gc["parts"].items():
        verdict = {True: "ok", False: "FAILED", None: "skipped"}[part["ok"]]
        figs = {k: v for k, v in part.items() if k not in ("ok", "where") and not isinstance(v, (dict, list))}
        out.append(f"| {name} | {verdict} | {', '.join(f'{k} {v}' for k, v in figs.items())} |")
    return out + [""]


def _endpoint_load(el: dict | None) -> list[str]:
    """results/endpoint_load.json (benchmarks/endpoint_load.py): serve-labeler under hostile load."""
    if not el:
        return []
    m, lim = el["machine"], el["limits"]
    out = ["## Labeler endpoint under load (`python -m benchmarks.endpoint_load`)", "",
           f"{el['what']}; {el['model']}; {m['cpus']} cores, load average before {m['load_avg_before'][0]:.2f}, "
           f"after {m['load_avg_after'][0]:.2f} (shared machine). Limits: {lim}. Traffic phase {el['traffic_s']} s.", "",
           "| requests | sent | answers |", "|---|---|---|"]
    for kind, n in el["sent"].items():
        codes = ", ".join(f"{c} x {k}" for c, k in el["status"].get(kind, {}).items())
        out.append(f"| {kind} | {n} | {codes} |")
    v, rss = el["valid_200"], el["replica_rss_mb"]
    out += ["", f"Valid requests answered 200: {v['count']}, latency p50 {v['p50_s']} s, p95 {v['p95_s']} s, "
            f"max {v['max_s']} s. Replica RSS {rss['before']:.0f} MB before, {rss['peak_during']:.0f} MB peak during, "
            f"{rss['after']:.0f} MB after.", ""]
    return out


def _judge_concurrency(jc: dict | None) -> list[str]:
    """results/judge_concurrency.json (benchmarks/judge_concurrency.py): an endpoint judge by requests in flight."""
    if not jc:
        return []
    out = ["## A judge behind vLLM's server: requests in flight (`python -m benchmarks.judge_concurrency`)", ""]
    for r in jc["runs"].values():
        out += [f"{r['what']}, {r['model']}; {r['pairs']} {r['task']} pairs ({r['requests_per_round']} requests a "
                f"round), {r['rounds']} rounds alternated, {r['cpus']} cores ({r['cpu']}), load average before "
                f"{r['load_before'][0]:.2f}, after {r['load_after'][0]:.2f}; {r['time']}.", "",
                "| reward.openai.max_concurrency | labels/s (median) | speed-up over 1 | largest label difference |",
                "|---|---|---|---|"]
        out += [f"| {c} | {v:.2f} | {r['speedup_over_1'][c]:.2f} | {r['max_label_difference'][c]:.1e} |"
                for c, v in r["labels_per_s"].items()]
        out.append("")
    best = max(x for r in jc["runs"].values() for x in r["speedup_over_1"].values())
    out += [f"The target is 3x with 8 requests in flight; the best measured here is {best:.2f}x"
            + (" (met)" if best >= 3 else " (not met)") + ". The client, vLLM's API server, its engine core and its "
            "worker share the same 2 cores: with the bundled model one 600-token prefill already takes both, so "
            "requests in flight can only overlap the per-request work (HTTP, scheduling, detokenising) with compute; "
            "with almost no compute (the tiny model) that per-request latency is what concurrency hides, as on a GPU "
            "server or a hosted API, where it is larger still (not measured here). The labels are the same either way.",
            ""]
    return out


def _value_baseline(vb: dict | None) -> list[str]:
    """results/value_baseline.json (benchmarks/value_baseline.py): does the value head learn?"""
    if not vb:
        return []
    out = ["## Value baseline (`python -m benchmarks.value_baseline`)", "",
           f"{vb['model']}, {vb['batches']} fixed batches of {vb['rows']} rollouts cycled for {vb['steps']} steps; "
           f"{vb['note']}. Figures at steps 0 / mid / last.", "",
           "| rl.value_lr (rl.value_trunk) | value loss | E[A^2] value baseline | E[A^2] no baseline | Var(A) value | Var(A) none |",
           "|---|---|---|---|---|---|"]
    for lr, r in vb["summary"].items():
        out.append(f"| {lr} | {r['value_loss']} | {r['adv_sq_value']} | {r['adv_sq_none']} | {r['adv_var_value']} | "
                   f"{r['adv_var_none']} |")
    return out + [""]


def _settings(st: dict | None) -> list[str]:
    """results/settings.json: defaults that rest on a measurement (kept here, not in code comments)."""
    if not st:
        return []
    out = ["## Settings chosen by measurement", "", st["what"] + ".", "", "| setting | measured | default |", "|---|---|---|"]
    out += [f"| `{r['setting']}` | {r['figure']} | {r['default']} |" for r in st["rows"]]
    return out + [""]


def main() -> None:
    global RESULTS
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default=str(RESULTS), help="folder of the results JSON files")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()
    RESULTS = Path(args.results)
    text = render()
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
