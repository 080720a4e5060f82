"""Data: the Arrow schema of every batch between stages (schemas.py), reading the user's and
the bundled data files (files.py; the bundled sets and their provenance in bundled/), and
the tasks: prompt sets, their train/held-out split and the resumable prompt sampler
(tasks.py).

May import: rlaif_ray.config, rlaif_ray.storage, rlaif_ray.rubrics. No torch models, no Ray.
"""
