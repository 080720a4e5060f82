"""Command line: rlaif-ray train | signal | prepare-model."""
from __future__ import annotations

import argparse
import json
import sys

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
        elif args.command == "signal":
            from .signal import measure_scorers

            names = None if args.scorers == "all" else (args.scorers.split(",") if args.scorers else [cfg.reward.scorer])
            for result in measure_scorers(cfg, names, args.n):
                print(json.dumps(result))
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
