"""Command line: rlaif-ray train | eval | sft | sample-pairs | label | train-rm | run | eval-labeler |
serve-labeler | signal | check | export | prepare-model."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from rlaif_ray.config import ConfigError, load_config
from rlaif_ray.data.files import DataError
from rlaif_ray.feedback.openai_api import EndpointError


def _out_args(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--out", help=help)
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set rl.lr=2e-5 (repeatable)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)


_DEBUG_HELP = "show the traceback of an error instead of its one-line message (also: RLAIF_RAY_DEBUG=1)"
# the errors a user can cause and fix (config, data, paths, endpoint): one line each, exit 2
USER_ERRORS = (ConfigError, DataError, EndpointError, OSError)


def one_line(err: BaseException) -> str:
    """An error's message on one line (a message of several lines is joined with '; '); an
    actor's error (RayTaskError) by its own message, without the remote traceback."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        err = cause
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) or type(err).__name__


_OVERWRITE_HELP = ("replace an existing non-empty output: the old one is moved aside to OUT.replaced-TIMESTAMP "
                   "beside it (nothing is deleted), once every check has passed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlaif-ray", description=__doc__)
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    _training_commands(sub)
    _labeler_commands(sub)
    return parser


def _training_commands(sub) -> None:
    p = sub.add_parser("train", help="RL from AI feedback on local Ray or a cluster")
    _config_args(p)
    p.add_argument("--out", help="run folder (default: run.out_dir/run.name-TIMESTAMP)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    p = sub.add_parser("eval", help="policy A against policy B on held-out prompts, judged by the AI labeler")
    _config_args(p)
    p.add_argument("--a", help="policy A: a checkpoint folder (default: eval.policy_a, else model.name)")
    p.add_argument("--b", help="policy B: a checkpoint folder (default: eval.policy_b, else model.name)")
    _out_args(p, "output folder (default: run.out_dir/run.name-eval-TIMESTAMP)")
    p = sub.add_parser("sft", help="supervised fine-tuning on reference responses (Ray Train)")
    _config_args(p)
    _out_args(p, "checkpoint folder (default: sft.output)")
    p = sub.add_parser("sample-pairs", help="two responses per prompt from a policy -> pairs file for `label`")
    _config_args(p)
    _out_args(p, "pairs JSONL (default: sample_pairs.output)")
    p = sub.add_parser("train-rm", help="reward model from AI soft labels (or human labels), Ray Train")
    _config_args(p)
    _out_args(p, "checkpoint folder (default: rm.output)")
    p = sub.add_parser("run", help="the canonical chain: sft -> sample-pairs -> label -> train-rm -> train -> eval")
    _config_args(p)
    _out_args(p, "chain folder (default: run.out_dir/run.name-chain-TIMESTAMP)")
    p = sub.add_parser("signal", help="measure how well scorers rank a post's own summary above another post's")
    _config_args(p)
    p.add_argument("--scorers", default=None, help="comma-separated scorer names, or 'all' (default: the config's)")
    p.add_argument("--n", type=int, default=40, help="number of posts")


def _labeler_commands(sub) -> None:
    p = sub.add_parser("eval-labeler", help="AI-labeler alignment with human labels and position bias")
    _config_args(p)
    p.add_argument("--data", default="hh_harmless",
                   help="comma-separated bundled sets (hh_harmless, hh_helpful, pandalm, tldr_ai_judged) and/or "
                   "files of human-labelled pairs (.jsonl, .jsonl.gz, .parquet), each row either chosen/rejected "
                   "(HH transcripts) or context/response_1/response_2/label (label 1 or 2: the preferred response)")
    p.add_argument("--task", choices=("summarization", "helpful", "harmless"), default=None,
                   help="labeler task for --data files (default: reward.pairwise.task; bundled sets have their own)")
    p.add_argument("--prompts", default="base", help="comma-separated PREAMBLE[+cot][:K], e.g. base,base:2,base+cot, "
                   "or 'grid' for base/detailed x 0/1/2-shot x CoT off/on")
    p.add_argument("--n", type=int, default=100, help="pairs per data set")
    _out_args(p, "JSON file for the table (default: print only)")
    p.add_argument("--report", default=None, help="folder for the HTML report (default: run.out_dir/run.name-labeler-TIMESTAMP)")
    p = sub.add_parser("label", help="AI preference labels for a file of response pairs -> Parquet (Ray Data)")
    _config_args(p)
    p.add_argument("--input", default=None, help="JSONL/Parquet pairs or a bundled set (default: label.input)")
    p.add_argument("--output", default=None, help="output folder of Parquet files (default: label.output)")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    p = sub.add_parser("serve-labeler", help="the labeler as an OpenAI-compatible /v1/completions endpoint (Ray Serve)")
    _config_args(p)
    p = sub.add_parser("check", help="validate a config (and its fit on a cluster file) without starting anything")
    _config_args(p)
    p.add_argument("--cluster", help="a Ray cluster YAML (clusters/*.yaml) or KubeRay manifest to plan the layout on")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU for the per-GPU plan (default 80)")
    sub.add_parser("prepare-model", help="convert the embedded default model to safetensors (cached)")
    _export_command(sub)


def _export_command(sub) -> None:
    p = sub.add_parser("export", help="a train run's policy as a Hugging Face model folder with a model card "
                       "(optionally pushed to the Hub)")
    p.add_argument("run", metavar="RUN", help="a train run folder (a path or a URI such as s3://bucket/runs/NAME)")
    p.add_argument("--to", required=True, metavar="DIR", help="the model folder to write (new or empty)")
    p.add_argument("--checkpoint", default="latest", metavar="latest|step-N",
                   help="which checkpoint (default: latest, what --resume would take)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="the weights' dtype in the export (default float32: the checkpoint's own, exact)")
    p.add_argument("--push", metavar="REPO_ID", help="then upload the folder to this Hub model repo (OWNER/NAME; "
                   "created if missing; the token from HF_TOKEN or `hf auth login`)")
    p.add_argument("--private", action="store_true", help="with --push: create the repo private")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP.replace("OUT", "DIR"))
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except USER_ERRORS as e:
        if args.debug or os.environ.get("RLAIF_RAY_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


def check_arguments(cfg, args) -> None:
    """Names from a list given on the command line, and model folders, checked before anything loads."""
    from rlaif_ray.run.preflight import check_model_paths

    check_model_paths(cfg, args.command)
    if args.command == "eval-labeler":
        from rlaif_ray.data.tasks import BUNDLED
        from rlaif_ray.feedback.labeler_eval import GRID, parse_variant
        from rlaif_ray.feedback.pairs import looks_like_file

        for name in args.data.split(","):  # a file is read and checked by the preflight
            if name not in BUNDLED and not looks_like_file(name):
                raise ConfigError(f"eval-labeler --data: unknown pair set {name!r}; "
                                  f"known: {', '.join(sorted(BUNDLED))}, or a JSONL/Parquet file of human-labelled "
                                  "pairs (a path: .jsonl, .jsonl.gz, .parquet)")
        for variant in GRID if args.prompts == "grid" else args.prompts.split(","):
            parse_variant(variant)
    if args.command == "signal" and args.scorers not in (None, "all"):
        from rlaif_ray.rubrics import SCORERS

        for name in args.scorers.split(","):
            if name not in SCORERS:
                raise ConfigError(f"signal --scorers: unknown scorer {name!r}; "
                                  f"known: {', '.join(sorted(SCORERS))} or 'all'")


def _check(cfg, args) -> None:
    if not args.gpu_gib > 0:  # NaN too; before anything is printed
        raise ConfigError(f"check --gpu-gib: must be a positive number of GiB, got {args.gpu_gib:g}")
    print(f"{args.config}: the config is valid (fields, batch arithmetic, engine settings)")
    from rlaif_ray.cpu.threads import thread_warnings

    for line in thread_warnings(cfg):  # as train's preflight warns
        print(f"warning: {line}")
    from rlaif_ray.run.gpu_memory import gpu_plan

    memory = gpu_plan(cfg, args.gpu_gib)
    if memory:
        print(f"memory per GPU (estimates on {args.gpu_gib:g} GiB GPUs; rlaif_ray/run/gpu_memory.py):")
        for line in memory:
            print("  " + line)
    if args.cluster:
        from rlaif_ray.run.cluster_plan import plan, read_cluster, shared_mounts, storage_plan

        nodes = read_cluster(args.cluster)
        lines = plan(cfg, nodes) + [storage_plan(cfg, nodes, shared_mounts(args.cluster))]
        print(f"placement on {args.cluster}:")
        for line in lines:
            print("  " + line)


def _train(cfg, args) -> None:
    from rlaif_ray.commands.train import train

    train(cfg, args.out, resume=args.resume, overwrite=args.overwrite)


def _sft(cfg, args) -> None:
    from rlaif_ray.commands.sft import run_sft

    run_sft(cfg, args.out, overwrite=args.overwrite)


def _train_rm(cfg, args) -> None:
    from rlaif_ray.commands.train_rm import run_train_rm

    run_train_rm(cfg, args.out, overwrite=args.overwrite)


def _sample_pairs(cfg, args) -> None:
    from rlaif_ray.commands.sample_pairs import sample_pairs

    sample_pairs(cfg, args.out, overwrite=args.overwrite)


def _run_chain(cfg, args) -> None:
    from rlaif_ray.commands.run_chain import run_chain

    run_chain(cfg, args.out, overwrite=args.overwrite)


def _eval(cfg, args) -> None:
    from rlaif_ray.commands.evaluate import run_eval

    cfg.eval.policy_a = args.a or cfg.eval.policy_a
    cfg.eval.policy_b = args.b or cfg.eval.policy_b
    run_eval(cfg, args.out, overwrite=args.overwrite)


def _eval_labeler(cfg, args) -> None:
    from rlaif_ray.commands.eval_labeler import run_eval_labeler

    run_eval_labeler(cfg, args.data, args.prompts, args.n, args.out, args.report, overwrite=args.overwrite,
                     task=args.task)


def _label(cfg, args) -> None:
    from rlaif_ray.commands.label import label_file

    label_file(cfg, args.input, args.output, overwrite=args.overwrite)


def _serve_labeler(cfg, args) -> None:
    from rlaif_ray.commands.serve_labeler import serve_labeler

    url = serve_labeler(cfg)
    print(f"labeler serving OpenAI-compatible completions at {url} (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def _signal(cfg, args) -> None:
    from rlaif_ray.commands.signal import measure_scorers

    names = None if args.scorers == "all" else (args.scorers.split(",") if args.scorers else [cfg.reward.scorer])
    for result in measure_scorers(cfg, names, args.n):
        print(json.dumps(result))


# each command's module is imported on use, so `--help` and `check` do not load torch and Ray
COMMANDS = {"check": _check, "train": _train, "sft": _sft, "train-rm": _train_rm, "sample-pairs": _sample_pairs,
            "run": _run_chain, "eval": _eval, "eval-labeler": _eval_labeler, "label": _label,
            "serve-labeler": _serve_labeler, "signal": _signal}


def run(args) -> int:
    """One command: the config loaded (and the names given on the command line checked), then
    the command's own function."""
    if args.command == "prepare-model":
        from rlaif_ray.engines.models import ensure_default_model

        print(ensure_default_model())
        return 0
    if args.command == "export":  # a run folder, not a config
        from rlaif_ray.commands.export import run_export

        run_export(args.run, args.to, args.checkpoint, push=args.push, private=args.private,
                   overwrite=args.overwrite, dtype=args.dtype)
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.command != "check":
        check_arguments(cfg, args)
    COMMANDS[args.command](cfg, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
