"""Command line: rlaif-ray train | label | eval-labeler | serve-labeler | signal | prepare-model."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError, load_config
from .data import DataError
from .openai_api import EndpointError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set rl.lr=2e-5 (repeatable)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlaif-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="RL from AI feedback on local Ray or a cluster")
    _common(p)
    p.add_argument("--out", help="run folder (default: run.out_dir/run.name-TIMESTAMP)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p = sub.add_parser("signal", help="measure how well scorers rank a post's own summary above another post's")
    _common(p)
    p.add_argument("--scorers", default=None, help="comma-separated scorer names, or 'all' (default: the config's)")
    p.add_argument("--n", type=int, default=40, help="number of posts")
    p = sub.add_parser("eval-labeler", help="AI-labeler alignment with human labels and position bias")
    _common(p)
    p.add_argument("--data", default="hh_harmless",
                   help="comma-separated: hh_harmless, hh_helpful, pandalm, tldr_ai_judged")
    p.add_argument("--prompts", default="base", help="comma-separated PREAMBLE[+cot][:K], e.g. base,base:2,base+cot, "
                   "or 'grid' for base/detailed x 0/1/2-shot x CoT off/on")
    p.add_argument("--n", type=int, default=100, help="pairs per data set")
    p.add_argument("--out", default=None, help="JSON file for the table (default: print only)")
    p = sub.add_parser("label", help="AI preference labels for a file of response pairs -> Parquet (Ray Data)")
    _common(p)
    p.add_argument("--input", default=None, help="JSONL/Parquet pairs or a bundled set (default: label.input)")
    p.add_argument("--output", default=None, help="output folder of Parquet files (default: label.output)")
    p = sub.add_parser("serve-labeler", help="the labeler as an OpenAI-compatible /v1/completions endpoint (Ray Serve)")
    _common(p)
    sub.add_parser("prepare-model", help="convert the embedded default model to safetensors (cached)")
    args = parser.parse_args(argv)

    try:
        if args.command == "prepare-model":
            from .models import ensure_default_model

            print(ensure_default_model())
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "train":
            from .driver import train

            train(cfg, args.out, resume=args.resume)
        elif args.command == "eval-labeler":
            variants = GRID if args.prompts == "grid" else args.prompts.split(",")
            rows = []
            print(f"{'data':14} {'prompt':16} {'n':>4} {'alignment':>9} {'95% CI':>13} {'1 order':>7} "
                  f"{'same slot':>9} {'1st slot':>8} {'s':>6}", flush=True)
            for r in eval_labeler(cfg, args.data.split(","), variants, args.n):
                rows.append(r)
                print(f"{r['data']:14} {r['variant']:16} {r['n']:4d} {r['alignment']:9.1%} "
                      f"{r['ci95'][0]:6.1%}-{r['ci95'][1]:5.1%} {r['single_order_alignment']:7.1%} "
                      f"{r['same_position_share']:9.1%} {r['of_which_first_slot']:8.1%} {r['wall_s']:6.0f}", flush=True)
                if args.out:  # saved as it goes: a long grid can be stopped and read
                    Path(args.out).write_text(json.dumps({"model": cfg.reward.model or cfg.model.name,
                                                          "backend": cfg.reward.backend, "rows": rows}, indent=1))
        elif args.command == "label":
            from .label_file import label_file

            label_file(cfg, args.input, args.output)
        elif args.command == "serve-labeler":
            import time

            from actors.labeler_server import serve_labeler

            url = serve_labeler(cfg)
            print(f"labeler serving OpenAI-compatible completions at {url} (Ctrl-C stops)", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        elif args.command == "signal":
            from .signal import measure_scorers

            names = None if args.scorers == "all" else (args.scorers.split(",") if args.scorers else [cfg.reward.scorer])
            for result in measure_scorers(cfg, names, args.n):
                print(json.dumps(result))
    except (ConfigError, DataError, EndpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


GRID = [f"{p}{'+cot' if cot else ''}:{k}" for p in ("base", "detailed") for cot in (False, True) for k in (0, 1, 2)]


def eval_labeler(cfg, datasets: list[str], variants: list[str], n: int):
    """Yields one result row per (data set, prompt variant), with its wall time."""
    import time

    import torch

    from .labeling import Judge, load_engine
    from .pairs import evaluate_labeler, parse_variant

    for v in variants:
        parse_variant(v)  # refuse a typo before loading anything
    engine, tokenizer, _ = load_engine(cfg.reward, cfg.reward.model or cfg.model.name, cfg.model.dtype)
    judge = Judge(engine, tokenizer, cfg.reward.scorer, cfg.reward.batch_size, prefix_sharing=cfg.reward.prefix_sharing)
    with torch.no_grad():
        for d in datasets:
            for v in variants:
                t0, cut = time.perf_counter(), judge.truncated
                row = evaluate_labeler(judge, d, v, n, cfg.rl.seed, cfg.reward.pairwise.cot_max_tokens)
                yield {**row, "truncated_prompts": judge.truncated - cut, "wall_s": round(time.perf_counter() - t0, 1)}


if __name__ == "__main__":
    sys.exit(main())
