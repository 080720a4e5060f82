"""rlaif-ray's core: the logic of RL from AI feedback, without Ray (testable in one process).

Packages by concern, imported one way (tests/test_architecture.py checks every import):

    config.py, storage.py, rubrics.py   the base: the typed config, crash-safe files, the built-in rubrics
    data/        schemas, data files, tasks and prompt sets
    engines/     models, devices, LM primitives, the HF and vLLM engines, weight transfer
    feedback/    AI feedback: prompts, scoring, judges and endpoints, pair data, win rates
    rl/          RL losses, the policy learner, SFT and reward-model training
    run/         preflight, start-up resolution, the run folder, measures, reports, layout
    cpu/         CPU-only measures, imported on the start-up path only
    commands/    the command line: parse, preflight, call (the Ray layer is ../actors)

A package may import the ones above it in this list (run may import every other one).
"""
