"""RL and supervised training: the RL math as small pure functions (losses.py: KL estimators,
returns, baselines, the surrogate loss, the adaptive KL controller; algorithms.py: grpo, ppo
and online_dpo's losses), the policy learner
(learner.py: policy, reference, optimizer, one step, checkpoints, FSDP2), and SFT and
reward-model training on AI labels (supervised.py).

May import: rlaif_ray.config, rlaif_ray.storage, rlaif_ray.remote_folder, rlaif_ray.rubrics, rlaif_ray.data,
rlaif_ray.engines, rlaif_ray.feedback. No Ray.
"""
