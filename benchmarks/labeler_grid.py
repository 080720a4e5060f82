"""The AI-labeler alignment grid: base/detailed x 0/1/2-shot x CoT off/on on HH harmless, HH
helpful and PandaLM pairs, through `rlaif-ray eval-labeler` (the same code path). Without CoT
on --n pairs per set, with CoT on --cot-n (decoding rationales costs most of the time).

    python -m benchmarks.labeler_grid --n 300 --cot-n 80 --backend vllm    # about 2 h on 2 cores
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--data", default="hh_harmless,hh_helpful,pandalm")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--cot-n", type=int, default=80)
    ap.add_argument("--backend", default="vllm", choices=["hf", "vllm"])
    ap.add_argument("--cot-max-tokens", type=int, default=64)
    args = ap.parse_args()

    from rlaif_ray.commands.eval_labeler import eval_labeler
    from rlaif_ray.config import load_config

    cfg = load_config(args.config, [f"reward.backend={args.backend}", "reward.batch_size=16",
                                    f"reward.pairwise.cot_max_tokens={args.cot_max_tokens}"])
    for name, cot, n in (("labeler_grid", False, args.n), ("labeler_grid_cot", True, args.cot_n)):
        variants = [f"{p}{'+cot' if cot else ''}:{k}" for p in ("base", "detailed") for k in (0, 1, 2)]
        load_before, rows = os.getloadavg(), []
        for row in eval_labeler(cfg, args.data.split(","), variants, n):
            rows.append(row)
            note = (f"{cfg.reward.model or cfg.model.name}, backend {args.backend}"
                    f"{' (bf16)' if args.backend == 'vllm' else ''}, {n} pairs per set (95% CI about "
                    f"+-{196 * math.sqrt(0.25 / n):.0f} points at 50%)"
                    f"{f', rationales up to {args.cot_max_tokens} tokens' if cot else ''}; {os.cpu_count()} cores, "
                    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average before "
                    f"{'/'.join(f'{x:.2f}' for x in load_before)}")
            (RESULTS / f"{name}.json").write_text(json.dumps({"note": note, "rows": rows}, indent=1))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
