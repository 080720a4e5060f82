"""The run around the method: the checks before anything starts (preflight.py), the
machine-dependent `auto` values resolved at start-up (resolve.py), the run folder
(folder.py) and the experiment trackers it feeds (trackers.py: TensorBoard, W&B, MLflow),
the measures that are not the reward and the reward-hacking verdict (measures.py), the
reports (report.py), a run's policy as a Hugging Face model folder (export.py), placement
and cluster planning (layout.py, cluster_plan.py, scaling.py) and peak-memory sampling
(memory.py).

May import: every other package of the core (rlaif_ray.cpu only from the start-up modules
preflight.py and resolve.py). No Ray.
"""
