"""The report at the end of `train`, `eval` and `eval-labeler`: PNG plots (matplotlib) and
one self-contained HTML page (plots inlined) with the run's config and headline numbers.
Open RUN/report.html in a browser; it needs no server and no network."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"a": "#1f77b4", "b": "#ff7f0e", "lc": "#2ca02c", "ref": "#7f7f7f"}


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def page(title: str, headline: list[tuple[str, str]], plots: list[tuple[str, Path]], config_text: str,
         notes: list[str] | None = None, top: str = "", middle: str = "") -> str:
    """One HTML page; the PNGs are embedded as data URIs so the file stands alone. `top`
    (HTML) goes right under the title, `middle` between the headline and the plots."""
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in headline)
    figs = "".join(
        f'<figure><img alt="{html.escape(cap)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{html.escape(cap)}</figcaption></figure>'
        for cap, p in plots)
    note = "".join(f"<p class=note>{html.escape(n)}</p>" for n in notes or [])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:24px;max-width:1400px}} table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left}} figure{{display:inline-block;margin:8px}}
img{{max-width:640px}} pre{{background:#f4f4f4;padding:8px;overflow:auto;max-height:400px}}
.note{{color:#555}} .verdict{{border:3px solid;padding:8px 14px;margin:0 0 16px;font-size:1.1em}}
.hacking{{border-color:#d62728;background:#fde8e8}} .clean{{border-color:#2ca02c;background:#eaf6ea}}
.unknown{{border-color:#999;background:#f4f4f4}} td.better{{background:#eaf6ea}} td.worse{{background:#fde8e8}}
table.examples td{{vertical-align:top;max-width:260px;font-size:0.9em}}</style></head><body>
<h1>{html.escape(title)}</h1>{top}
<table>{rows}</table>{note}{middle}<h2>Plots</h2>{figs}
<h2>Config</h2><pre>{html.escape(config_text)}</pre></body></html>"""


def _pct(ci) -> str:
    return f"{ci[0]:.1%}-{ci[1]:.1%}"


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def verdict_box(verdict: dict | None) -> str:
    """The reward-hacking verdict (measures.hacking_verdict), first thing on the page."""
    if not verdict:
        return ('<div class="verdict unknown"><b>Reward hacking: not checked</b> (no held-out evaluation '
                'before and after training in this run)</div>')
    if verdict["hacking"]:
        return (f'<div class="verdict hacking"><b>REWARD HACKING SUSPECTED</b>: {html.escape(verdict["reason"])}</div>')
    return f'<div class="verdict clean"><b>No sign of reward hacking</b>: {html.escape(verdict["reason"])}</div>'


def measures_table(comp: dict, summary: dict, win: dict | None) -> str:
    """The training reward's change, the win rate against the initial policy and the
    independent measures in one table, each with its 95% interval (docs/method.md §7.6)."""
    from rlaif_ray.run.measures import DECIMALS, MEASURES, direction

    verdict = comp.get("hacking") or {}
    worse, better = set(verdict.get("worse", [])), set(verdict.get("better", []))

    def row(label, before, after, change, judged, name=None):
        cls = f' class="{"worse" if name in worse else "better" if name in better else ""}"' if name else ""
        return (f"<tr><th>{html.escape(label)}</th><td>{before}</td><td>{after}</td><td{cls}>{change}</td>"
                f"<td>{html.escape(judged)}</td></tr>")

    rc = comp.get("reward_change") or summary.get("heldout_change")
    b, a = summary.get("heldout_before", {}), summary.get("heldout_after", {})
    rows = []
    if rc:
        rising = direction(rc["mean"], rc.get("ci95_halfwidth"))
        rows.append(row("held-out reward (the training judge)", _num(b.get("reward_mean"), "+.4f"),
                        _num(a.get("reward_mean", comp.get("heldout_reward")), "+.4f"),
                        f"{rc['mean']:+.4f} +- {_num(rc.get('ci95_halfwidth'), '.4f')}",
                        "what training optimises: " + {1: "rose", -1: "fell", 0: "within its interval"}[rising]))
    if win and "win_rate" in win:
        rows.append(row("win rate vs initial (pairwise judge)", "50% by definition", f"{win['win_rate']:.1%}",
                        f"95% CI {_pct(win['ci95'])}, n={win['n']}", "independent: higher is better", "win_rate"))
    for name, m in comp.get("independent", {}).items():
        label, higher = MEASURES.get(name, (name, None))
        d = DECIMALS.get(name, 3)
        rows.append(row(label, f"{m['before']:.{d}f}", f"{m['after']:.{d}f}",
                        f"{m['change']:+.{d}f} +- {_num(m['ci95_halfwidth'], f'.{d}f')}",
                        "independent: " + {True: "higher is better", False: "lower is better",
                                           None: "neither better nor worse"}[higher], name))
    return ("<h2>Reward against measures that are not the reward</h2><table><tr><th>measure</th><th>initial policy"
            "</th><th>final policy</th><th>change (paired 95% CI)</th><th>reading</th></tr>" + "".join(rows) +
            "</table><p class=note>Held-out prompts, the same seed before and after. A change counts when its "
            "interval is clear of zero (green: better, red: worse); ROUGE is against the human-written reference.</p>")


def examples_table(examples: list[dict], prompt_chars: int = 300) -> str:
    """Held-out examples side by side: what the reward came to favour, in the responses' words."""
    if not examples:
        return ""
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(e['prompt'][:prompt_chars] + ('...' if len(e['prompt']) > prompt_chars else ''))}</td>"
        f"<td>{esc(e.get('reference') or '')}</td><td>{esc(e['initial'])}</td><td>{esc(e['final'])}</td>"
        f"<td>{_num(e['reward_initial'], '+.3f')} -> {_num(e['reward_final'], '+.3f')}</td>"
        f"<td>{_num(e['rougeL_initial'], '.3f')} -> {_num(e['rougeL_final'], '.3f')}</td></tr>"
        for e in examples)
    return ("<h2>Held-out examples, initial and final policy</h2><table class=examples><tr><th>prompt (shortened)"
            "</th><th>human reference</th><th>initial response</th><th>final response</th><th>reward</th>"
            "<th>ROUGE-L F1</th></tr>" + rows + "</table><p class=note>The largest reward gains first, then the "
            "largest ROUGE-L drops.</p>")


def _line_plot(path: Path, title: str, x: list, series: dict[str, list], ylabel: str) -> tuple[str, Path]:
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for (label, y), color in zip(series.items(), ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")):
        ax.plot(x, y, marker="o", ms=3, color=color, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return title, _save(fig, path)


def _metric_plots(m: list[dict], plots: Path) -> list:
    """One plot per metrics.jsonl series: reward, KL, beta, loss, staleness, throughput, waits."""
    steps = [r["step"] for r in m]
    wanted = [("Mean reward per batch", ["reward_mean"], "reward", "reward.png"),
              ("KL to the reference policy", ["kl"], "KL (per sequence)", "kl.png"),
              # written by runs with KL control (docs/method.md §3); older runs have only `kl`
              ("KL to the reference policy, per token", ["kl_per_token"], "KL (per token)", "kl_per_token.png"),
              ("KL coefficient beta", ["kl_beta"], "beta", "kl_beta.png"),
              ("Loss", ["loss", "pg_loss", "value_loss"], "loss", "loss.png"),
              ("Policy lag of each trained batch", ["staleness"], "versions", "staleness.png"),
              ("Throughput of the loop", ["completions_per_s"], "completions / s", "throughput.png"),
              ("Learner idle: wait for each batch", ["waited_for_batch_s"], "seconds", "learner_wait.png")]
    return [_line_plot(plots / name, title, steps, {k: [r.get(k) for r in m] for k in keys}, ylabel)
            for title, keys, ylabel, name in wanted if any(keys[0] in r for r in m)]


def _winrate_plot(wr: list[dict], plots: Path) -> list:
    fig, ax = plt.subplots(figsize=(6, 3.4))
    x = [r["step"] for r in wr]
    y = [r["win_rate"] for r in wr]
    err = [[r["win_rate"] - r["ci95"][0] for r in wr], [r["ci95"][1] - r["win_rate"] for r in wr]]
    ax.errorbar(x, y, yerr=err, marker="o", color=COLORS["a"], capsize=4, label="win rate (95% CI)")
    ax.plot(x, [r["length_controlled"] for r in wr], marker="s", color=COLORS["lc"], label="length-controlled")
    ax.axhline(0.5, color=COLORS["ref"], ls="--", lw=1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("step")
    ax.set_ylabel("win rate vs initial policy")
    ax.set_title("Held-out win rate against the initial policy")
    ax.legend()
    return [("Held-out win rate against the initial policy", _save(fig, plots / "winrate.png"))]


def _independent_plot(evals: list[dict], plots: Path) -> list:
    """The reward's change beside the independent ones, per evaluation: do they agree?"""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    x = [r["step"] for r in evals]
    for key, label, color in (("reward", "held-out reward", "#d62728"), ("rougeL", "ROUGE-L F1", "#1f77b4"),
                              ("rouge1", "ROUGE-1 F1", "#9467bd"), ("commentary", "commentary share", "#ff7f0e")):
        c = [r["reward_change"] if key == "reward" else r["independent"].get(key) for r in evals]
        if all(v is None for v in c):
            continue
        y = [v["mean" if key == "reward" else "change"] if v else None for v in c]
        err = [(v or {}).get("ci95_halfwidth") or 0.0 for v in c]
        ax.errorbar(x, y, yerr=err, marker="o", ms=3, capsize=3, color=color, label=label)
    ax.axhline(0.0, color=COLORS["ref"], ls="--", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("change from the initial policy")
    ax.set_title("Held-out changes (paired 95% CI)")
    ax.legend(fontsize=8)
    return [("Held-out changes from the initial policy: reward and independent measures",
             _save(fig, plots / "independent.png"))]


def _stages_plot(busy: dict, loop: float, plots: Path) -> list:
    fig, ax = plt.subplots(figsize=(6, 3.4))
    names = list(busy)
    share = [min(busy[n] / loop, 1.0) for n in names]
    ax.barh(names, share, color=COLORS["a"], label="busy")
    ax.barh(names, [1 - s for s in share], left=share, color="#dddddd", label="idle")
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"share of the training loop ({loop:.0f} s)")
    ax.set_title("Per-stage busy and idle time")
    ax.legend(loc="lower right")
    return [("Per-stage busy and idle time", _save(fig, plots / "stages.png"))]


def _train_headline(run: Path, m: list[dict], summary: dict, wr: list[dict]) -> list[tuple[str, str]]:
    head = [("run", str(run))]
    if m:
        head += [("steps", str(len(m))), ("final reward (batch mean)", f"{m[-1]['reward_mean']:+.4f}"),
                 ("final KL", f"{m[-1]['kl']:+.4f}"), ("completions/s", f"{summary.get('completions_per_s', 0):.3f}")]
    if "heldout_change" in summary:
        c = summary["heldout_change"]
        head.append(("held-out reward change", f"{c['mean']:+.4f} +- {c['ci95_halfwidth']:.4f} (paired 95% CI)"))
    if wr:
        w = wr[-1]
        head.append(("win rate vs initial (last)", f"{w['win_rate']:.1%} (95% CI {_pct(w['ci95'])}, n={w['n']}); "
                                                   f"length-controlled {w['length_controlled']:.1%}"))
    if summary.get("recoveries"):
        head.append(("recoveries", str(len(summary["recoveries"]))))
    return head


def train_report(run: str | Path) -> Path:
    """reward, KL, loss, win rate over steps, throughput and learner idle time, per-stage
    busy/idle share, staleness."""
    run = Path(run)
    m = _lines(run / "metrics.jsonl")
    wr = _lines(run / "winrate.jsonl")
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    plots = _metric_plots(m, run / "plots") if m else []
    if wr:
        plots += _winrate_plot(wr, run / "plots")
    evals = [r for r in wr if r.get("independent") and r.get("reward_change")]
    if evals:
        plots += _independent_plot(evals, run / "plots")
    busy, loop = summary.get("stage_busy_s", {}), summary.get("loop_s")
    if busy and loop:
        plots += _stages_plot(busy, loop, run / "plots")
    cfg = (run / "config.yaml").read_text() if (run / "config.yaml").is_file() else ""
    # the verdict first: from the end of the run, else the last evaluation during it
    comp = summary if "hacking" in summary else next((r for r in reversed(wr) if "hacking" in r), {})
    win = summary.get("win_rate") or (wr[-1] if wr else None)
    top = verdict_box(comp.get("hacking")) + (measures_table(comp, summary, win) if comp else "")
    out = run / "report.html"
    out.write_text(page(f"rlaif-ray train: {run.name}", _train_headline(run, m, summary, wr), plots, cfg, top=top,
                        middle=examples_table(summary.get("heldout_examples", []))))
    return out


def _eval_bars(s: dict, plots: Path) -> list:
    """Win rate and length-controlled win rate (and harmless rates) with their intervals."""
    labels, vals, los, his, cols = [], [], [], [], []
    w, lc = s["win_rate"], s["length_controlled"]
    for lab, v, ci, c in (("win rate", w["win_rate"], w["ci95"], COLORS["a"]),
                          ("length-controlled", lc["value"], lc.get("ci95", [lc["value"]] * 2), COLORS["lc"])):
        labels.append(lab), vals.append(v), los.append(v - ci[0]), his.append(ci[1] - v), cols.append(c)
    for side in ("a", "b"):
        if "harmless" in s:
            h = s["harmless"][side]
            labels.append(f"harmless {side.upper()}"), vals.append(h["rate"]), cols.append(COLORS[side])
            los.append(h["rate"] - h["ci95"][0]), his.append(h["ci95"][1] - h["rate"])
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.bar(labels, vals, yerr=[los, his], capsize=6, color=cols)
    ax.axhline(0.5, color=COLORS["ref"], ls="--", lw=1)
    ax.set_ylim(0, 1)
    ax.set_title("A against B (95% intervals)")
    return [("Win rate, length-controlled win rate (and harmless rates)", _save(fig, plots / "winrate.png"))]


def _preference_plots(s: dict, use: list[dict], plots: Path) -> list:
    """The distribution of P(A preferred), and P(A) against the length ratio with the fit."""
    import math

    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.hist([r["p_a"] for r in use], bins=20, range=(0, 1), color=COLORS["a"])
    ax.axvline(0.5, color=COLORS["ref"], ls="--", lw=1)
    ax.set_xlabel("debiased P(A preferred)")
    ax.set_ylabel("pairs")
    ax.set_title("AI preference for A, per prompt")
    out = [("Distribution of P(A preferred)", _save(fig, plots / "p_a.png"))]
    x = [(r["chars_a"] + 1) / (r["chars_b"] + 1) for r in use]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.scatter(x, [r["p_a"] for r in use], s=14, color=COLORS["a"], label="pairs")
    if "length_controlled" in s and s["length_controlled"]["feature"] == "ratio":
        lc = s["length_controlled"]
        grid = [min(x) + (max(x) - min(x)) * i / 100 for i in range(101)]
        ax.plot(grid, [1 / (1 + math.exp(-(lc["intercept"] + lc["slope"] * g))) for g in grid],
                color=COLORS["lc"], label="logistic fit (win)")
        ax.axvline(1.0, color=COLORS["ref"], ls="--", lw=1)
    ax.set_xlabel("length ratio A/B (characters)")
    ax.set_ylabel("P(A preferred)")
    ax.set_title("Preference against length")
    ax.legend()
    return out + [("P(A preferred) against the length ratio", _save(fig, plots / "length.png"))]


def _eval_headline(s: dict) -> list[tuple[str, str]]:
    head = [("policy A", s.get("policy_a", "")), ("policy B", s.get("policy_b", "")), ("pairs", str(s["pairs"])),
            ("unusable labels", str(s["unusable_labels"]))]
    if "win_rate" in s:
        w, lc = s["win_rate"], s["length_controlled"]
        head += [("win rate A over B", f"{w['win_rate']:.1%} (95% CI {_pct(w['ci95'])}; {w['wins']} wins, "
                                       f"{w['ties']} ties, {w['losses']} losses)"),
                 ("length-controlled win rate", f"{lc['value']:.1%}" + (f" (95% CI {_pct(lc['ci95'])})" if "ci95" in lc else "")),
                 ("soft win rate (mean P(A))", f"{s['soft_win_rate']['mean']:.3f}")]
    head.append(("mean length (chars)", f"A {s['mean_chars']['a']:.0f}, B {s['mean_chars']['b']:.0f}"))
    if "harmless" in s:
        h = s["harmless"]
        head.append(("harmless rate", f"A {h['a']['rate']:.1%} ({_pct(h['a']['ci95'])}), B {h['b']['rate']:.1%} "
                                      f"({_pct(h['b']['ci95'])}); scorer {h['scorer']!r}: \"{h['question']}\", "
                                      f"harmless if P(Yes) >= {h['threshold']}"))
    return head


def eval_report(folder: str | Path) -> Path:
    """Win rate and length-controlled win rate with intervals, harmless rates, the
    distribution of P(A preferred), and P(A) against the length ratio with the fit."""
    import pyarrow.parquet as pq

    folder = Path(folder)
    s = json.loads((folder / "summary.json").read_text())
    use = [r for r in pq.read_table(folder / "judgements.parquet").to_pylist() if r["usable"]]
    plots = _eval_bars(s, folder / "plots") if "win_rate" in s else []
    if use:
        plots += _preference_plots(s, use, folder / "plots")
    cfg = (folder / "config.yaml").read_text() if (folder / "config.yaml").is_file() else ""
    out = folder / "report.html"
    out.write_text(page(f"rlaif-ray eval: {folder.name}", _eval_headline(s), plots, cfg))
    return out


def labeler_report(table: dict, folder: str | Path, config_text: str = "") -> Path:
    """`eval-labeler`: alignment with human labels (95% CI) and same-slot share per cell."""
    folder = Path(folder)
    rows = table["rows"]
    plots = []
    if rows:
        names = [f"{r['data']} {r['variant']}" for r in rows]
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.5))
        al = [r["alignment"] for r in rows]
        ax.barh(names, al, xerr=[[a - r["ci95"][0] for a, r in zip(al, rows)], [r["ci95"][1] - a for a, r in zip(al, rows)]],
                capsize=3, color=COLORS["a"])
        ax.axvline(0.5, color=COLORS["ref"], ls="--", lw=1)
        ax.set_xlim(0, 1)
        ax.invert_yaxis()
        ax.set_xlabel("alignment with human labels (95% CI)")
        ax.set_title("AI labeler alignment")
        plots.append(("Alignment with human labels", _save(fig, folder / "plots" / "alignment.png")))
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.5))
        ax.barh(names, [r["same_position_share"] for r in rows], color=COLORS["b"])
        ax.set_xlim(0, 1)
        ax.invert_yaxis()
        ax.set_xlabel("share of pairs where the same slot wins in both orders")
        ax.set_title("Position bias")
        plots.append(("Position bias", _save(fig, folder / "plots" / "position_bias.png")))
    head = [("labeler", f"{table.get('model')} ({table.get('backend')})"), ("cells", str(len(rows)))]
    if rows:
        best = max(rows, key=lambda r: r["alignment"])
        head.append(("best cell", f"{best['data']} {best['variant']}: {best['alignment']:.1%} (95% CI {_pct(best['ci95'])})"))
    for name, f in (table.get("files") or {}).items():  # the user's pair files (eval-labeler --data FILE)
        head.append((name, f"{f['usable']} of {f['rows']} rows usable, {f['skipped']} skipped "
                           f"(listed in table.json); labeler task {f['task']}"))
    out = folder / "report.html"
    out.write_text(page("rlaif-ray eval-labeler", head, plots, config_text))
    return out
