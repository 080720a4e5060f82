"""Command line: rlaif-ray train | signal | prepare-model."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError, load_config
from .data import DataError


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
    p.add_argument("--data", default="hh_harmless", help="comma-separated: hh_harmless, hh_helpful, pandalm")
    p.add_argument("--prompts", default="base", help="comma-separated PREAMBLE[+cot][:K], e.g. base,base:2,base+cot")
    p.add_argument("--n", type=int, default=100, help="pairs per data set")
    p.add_argument("--out", default=None, help="JSON file for the table (default: print only)")
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
            rows = eval_labeler(cfg, args.data.split(","), args.prompts.split(","), args.n)
            print(f"{'data':12} {'prompt':16} {'n':>4} {'alignment':>9} {'95% CI':>13} {'1 order':>7} "
                  f"{'same slot':>9} {'1st slot':>8}")
            for r in rows:
                print(f"{r['data']:12} {r['variant']:16} {r['n']:4d} {r['alignment']:9.1%} "
                      f"{r['ci95'][0]:6.1%}-{r['ci95'][1]:5.1%} {r['single_order_alignment']:7.1%} "
                      f"{r['same_position_share']:9.1%} {r['of_which_first_slot']:8.1%}")
            if args.out:
                Path(args.out).write_text(json.dumps(rows, indent=1))
        elif args.command == "signal":
            from .signal import measure_scorers

            names = None if args.scorers == "all" else (args.scorers.split(",") if args.scorers else [cfg.reward.scorer])
            for result in measure_scorers(cfg, names, args.n):
                print(json.dumps(result))
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def eval_labeler(cfg, datasets: list[str], variants: list[str], n: int) -> list[dict]:
    import torch

    from .labeling import Judge
    from .models import load_model, load_tokenizer
    from .pairs import evaluate_labeler

    name = cfg.reward.model or cfg.model.name
    judge = Judge(load_model(name, cfg.model.dtype), load_tokenizer(name), cfg.reward.scorer, cfg.reward.batch_size)
    with torch.no_grad():
        return [evaluate_labeler(judge, d, v, n, cfg.rl.seed) for d in datasets for v in variants]


if __name__ == "__main__":
    sys.exit(main())
