"""Command line: rlaif-ray train | eval | sft | sample-pairs | label | train-rm | run | eval-labeler |
serve-labeler | signal | check | prepare-model."""
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
    p = sub.add_parser("eval", help="policy A against policy B on held-out prompts, judged by the AI labeler")
    _common(p)
    p.add_argument("--a", help="policy A: a checkpoint folder (default: eval.policy_a, else model.name)")
    p.add_argument("--b", help="policy B: a checkpoint folder (default: eval.policy_b, else model.name)")
    p.add_argument("--out", help="output folder (default: run.out_dir/run.name-eval-TIMESTAMP)")
    p = sub.add_parser("sft", help="supervised fine-tuning on reference responses (Ray Train)")
    _common(p)
    p.add_argument("--out", help="checkpoint folder (default: sft.output)")
    p = sub.add_parser("sample-pairs", help="two responses per prompt from a policy -> pairs file for `label`")
    _common(p)
    p.add_argument("--out", help="pairs JSONL (default: sample_pairs.output)")
    p = sub.add_parser("train-rm", help="reward model from AI soft labels (or human labels), Ray Train")
    _common(p)
    p.add_argument("--out", help="checkpoint folder (default: rm.output)")
    p = sub.add_parser("run", help="the canonical chain: sft -> sample-pairs -> label -> train-rm -> train -> eval")
    _common(p)
    p.add_argument("--out", help="chain folder (default: run.out_dir/run.name-chain-TIMESTAMP)")
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
    p.add_argument("--report", default=None, help="folder for the HTML report (default: run.out_dir/run.name-labeler-TIMESTAMP)")
    p = sub.add_parser("label", help="AI preference labels for a file of response pairs -> Parquet (Ray Data)")
    _common(p)
    p.add_argument("--input", default=None, help="JSONL/Parquet pairs or a bundled set (default: label.input)")
    p.add_argument("--output", default=None, help="output folder of Parquet files (default: label.output)")
    p = sub.add_parser("serve-labeler", help="the labeler as an OpenAI-compatible /v1/completions endpoint (Ray Serve)")
    _common(p)
    p = sub.add_parser("check", help="validate a config (and its fit on a cluster file) without starting anything")
    _common(p)
    p.add_argument("--cluster", help="a Ray cluster YAML (clusters/*.yaml) or KubeRay manifest to plan the layout on")
    sub.add_parser("prepare-model", help="convert the embedded default model to safetensors (cached)")
    args = parser.parse_args(argv)

    try:
        if args.command == "prepare-model":
            from .models import ensure_default_model

            print(ensure_default_model())
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "check":
            print(f"{args.config}: the config is valid (fields, batch arithmetic, engine settings)")
            if args.cluster:
                from .cluster_plan import plan, read_cluster

                print(f"placement on {args.cluster}:")
                for line in plan(cfg, read_cluster(args.cluster)):
                    print("  " + line)
            return 0
        if args.command == "train":
            from .driver import train

            train(cfg, args.out, resume=args.resume)
        elif args.command == "sft":
            from .supervised import run_sft

            run_sft(cfg, args.out)
        elif args.command == "train-rm":
            from .supervised import run_train_rm

            run_train_rm(cfg, args.out)
        elif args.command == "sample-pairs":
            from .chain import sample_pairs

            sample_pairs(cfg, args.out)
        elif args.command == "run":
            from .chain import run_chain

            run_chain(cfg, args.out)
        elif args.command == "eval":
            from .evaluate import run_eval

            if args.a:
                cfg.eval.policy_a = args.a
            if args.b:
                cfg.eval.policy_b = args.b
            run_eval(cfg, args.out)
        elif args.command == "eval-labeler":
            variants = GRID if args.prompts == "grid" else args.prompts.split(",")
            rows = []
            table = {"model": cfg.reward.model or cfg.model.name, "backend": cfg.reward.backend, "rows": rows}
            print(f"{'data':14} {'prompt':16} {'n':>4} {'alignment':>9} {'95% CI':>13} {'1 order':>7} "
                  f"{'same slot':>9} {'1st slot':>8} {'s':>6}", flush=True)
            for r in eval_labeler(cfg, args.data.split(","), variants, args.n):
                rows.append(r)
                print(f"{r['data']:14} {r['variant']:16} {r['n']:4d} {r['alignment']:9.1%} "
                      f"{r['ci95'][0]:6.1%}-{r['ci95'][1]:5.1%} {r['single_order_alignment']:7.1%} "
                      f"{r['same_position_share']:9.1%} {r['of_which_first_slot']:8.1%} {r['wall_s']:6.0f}", flush=True)
                if args.out:  # saved as it goes: a long grid can be stopped and read
                    Path(args.out).write_text(json.dumps(table, indent=1))
            if cfg.run.report:
                import time

                from .config import dump_config
                from .report import labeler_report

                folder = Path(args.report or Path(cfg.run.out_dir) / f"{cfg.run.name}-labeler-{time.strftime('%Y%m%d-%H%M%S')}")
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "table.json").write_text(json.dumps(table, indent=1))
                print(f"report: {labeler_report(table, folder, dump_config(cfg))}")
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
    from tqdm import tqdm

    cells = [(d, v) for d in datasets for v in variants]
    with torch.no_grad(), tqdm(total=len(cells), desc="labeler cells", unit="cell", leave=False,
                               disable=not cfg.run.progress) as bar:
        for d, v in cells:
            bar.set_postfix_str(f"{d} {v}")
            t0, cut = time.perf_counter(), judge.truncated
            row = evaluate_labeler(judge, d, v, n, cfg.rl.seed, cfg.reward.pairwise.cot_max_tokens)
            bar.update(1)
            yield {**row, "truncated_prompts": judge.truncated - cut, "wall_s": round(time.perf_counter() - t0, 1)}


if __name__ == "__main__":
    sys.exit(main())
