"""Engines and devices: a causal LM that generates, reads label log-probs and takes new
weights, behind one interface (`HFEngine` in hf.py, `VLLMEngine` in vllm_engine.py, picked
by `backends.load_engine`); the LM primitives the engines and the learner share (lm.py: padding,
response log-probs, sampling, shared-prompt packing); model loading (models.py); the device
and precision rule (devices.py); and the weight transfer from the learner (weight_sync.py,
vllm_worker.py).

May import: rlaif_ray.config, rlaif_ray.storage, rlaif_ray.remote_folder, rlaif_ray.data. No Ray.
"""
