"""The paper's Table 5 at tiny scale: held-out accuracy on human-labelled pairs of a reward
model distilled from the bundled model's AI labels, against one trained on the human labels
of the same pairs (same data size, same init, same settings).

    python -m benchmarks.rm_accuracy --config configs/hh-harmless.yaml --pairs 300

Steps: the first --pairs usable pairs of the config's rm.eval_data set (never its last
rm.eval_n rows, which are the held-out set) are labeled by `label` with the config's
labeler prompt; pairs whose AI label is unusable are dropped from BOTH training sets; then
`train-rm` runs twice (label_kind soft, then human). Writes results/rm_accuracy.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/hh-harmless.yaml")
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--work", default="runs/rm-accuracy")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(RESULTS / "rm_accuracy.json"))
    args = ap.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    from rlaif_ray.commands.label import label_file
    from rlaif_ray.commands.train_rm import run_train_rm
    from rlaif_ray.config import load_config
    from rlaif_ray.feedback.pairs import load_pairs

    cfg = load_config(args.config, args.overrides)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    usable = [r for r in load_pairs(cfg.rm.eval_data, keep_bad=True)[0] if not r.get("error")]
    train_rows = usable[:len(usable) - cfg.rm.eval_n][:args.pairs]
    pairs = work / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({k: r[k] for k in ("id", "context", "response_a", "response_b", "human")}) + "\n"
                             for r in train_rows))
    t0 = time.perf_counter()
    labels_dir = work / "labels"
    if not labels_dir.exists():
        label_file(cfg, str(pairs), str(labels_dir))
    label_s = time.perf_counter() - t0
    table = pq.read_table(labels_dir)
    ok = table.filter(pa.compute.is_valid(table.column("p_a")))
    pq.write_table(ok, work / "usable_labels.parquet")
    same_dir = work / "usable"
    same_dir.mkdir(exist_ok=True)
    pq.write_table(ok, same_dir / "part-0.parquet")
    p_a, human = ok.column("p_a").to_pylist(), ok.column("human").to_pylist()
    ai_agrees = sum((p > 0.5) == (h == "a") for p, h in zip(p_a, human)) / max(len(p_a), 1)
    result = {"config": args.config, "labeler": cfg.reward.model or cfg.model.name, "pairwise": cfg.reward.pairwise.model_dump(),
              "pairs_labeled": table.num_rows, "pairs_usable": ok.num_rows, "label_s": round(label_s, 1),
              "ai_label_alignment_on_train_pairs": ai_agrees, "rm": {}}
    for kind in ("soft", "human"):
        c = cfg.model_copy(deep=True)
        c.rm.labels, c.rm.label_kind = str(same_dir), kind
        t1 = time.perf_counter()
        out = work / f"rm-{kind}"
        if not (out / "rm_summary.json").is_file():
            run_train_rm(c, out)
        s = json.loads((out / "rm_summary.json").read_text())
        result["rm"][kind] = {"pairs": s["pairs"], "heldout_pairs": s["heldout_pairs"],
                              "accuracy_by_epoch": [h["heldout_accuracy"] for h in s["history"]],
                              "train_loss_by_epoch": [h["train_loss"] for h in s["history"]],
                              "wall_s": round(time.perf_counter() - t1, 1)}
    result["rm_settings"] = cfg.rm.model_dump(mode="json")
    result["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("pairs_usable", "ai_label_alignment_on_train_pairs")}),
          {k: v["accuracy_by_epoch"] for k, v in result["rm"].items()})


if __name__ == "__main__":
    main()
