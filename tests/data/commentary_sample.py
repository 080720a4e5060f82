"""How tests/data/commentary_sample.jsonl was made: the demo's initial policy (configs/quickstart.yaml:
SmolLM2-135M-Instruct, its chat prompt, temperature 0.9, 40 new tokens) summarising the first 100
held-out-then-train TL;DR posts of the bundled set, one sample each (seed 999, as train's held-out
evaluation). Each response was then labelled by hand (`commentary`: true when its first sentence
talks to the poster about their text or judges it as writing, false when it says what the post
says, in any person), before the rule was run on them; tests/test_measures.py measures the rule
against these labels.

    HF_HUB_OFFLINE=1 python tests/data/commentary_sample.py > responses.jsonl   # then label by hand
"""
import json

from rlaif_ray.config import load_config
from rlaif_ray.data.tasks import task_prompts
from rlaif_ray.engines.hf import HFEngine
from rlaif_ray.engines.models import load_tokenizer

if __name__ == "__main__":
    cfg = load_config("configs/quickstart.yaml")
    prompts = task_prompts(cfg.task, load_tokenizer(cfg.model.name))
    items = (prompts.heldout + prompts.train)[:100]
    engine = HFEngine(cfg.model.name)
    out = []
    for i in range(0, len(items), 25):
        chunk = items[i:i + 25]
        tokens, _, _ = engine.generate([it["prompt_token_ids"] for it in chunk], temperature=0.9, top_p=1.0, top_k=0,
                                       max_new_tokens=40, seed=999 + i)
        out += [{"prompt_id": it["prompt_id"], "response": engine.tok.decode(t, skip_special_tokens=True).strip()}
                for it, t in zip(chunk, tokens)]
    for row in out:
        print(json.dumps(row))
