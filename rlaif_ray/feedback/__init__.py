"""AI feedback: what the paper's method is made of. The labeler's prompts and rubrics
(prompts.py, templates/), the label-token math (scoring.py: two-way softmax, both orders,
d-RLAIF scores), the judge over a local model or an OpenAI-compatible endpoint (labeling.py,
openai_api.py), response-pair data (pairs.py), how far a labeler can be trusted
(labeler_eval.py), and judgements of one policy against another with their statistics
(judgements.py, winrate.py, stats.py).

May import: rlaif_ray.config, rlaif_ray.storage, rlaif_ray.rubrics, rlaif_ray.data,
rlaif_ray.engines. No Ray.
"""
