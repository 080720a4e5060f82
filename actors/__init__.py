"""The Ray layer: one file per role, thin shells that hold an engine or a learner and call
the core (generator.py, labeler.py, reward_model.py, learner.py, pair_labeler.py,
labeler_server.py), what every actor needs (process.py, group.py, metrics.py, the Ray
session in ray_session.py), and the controllers that drive them: the training pipeline
(pipeline.py, weights.py, training.py), judging (evaluation.py) and the Ray Train loops of
sft and train-rm (ray_train.py).

May import: rlaif_ray's core, never rlaif_ray.commands.
"""
