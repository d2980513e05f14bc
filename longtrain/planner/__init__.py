"""What fits before launching: one training step simulated on fake tensors at the target
world size, memory per GPU by category, and the longest sequence that fits.

    simulate.Planner(cfg, plan)   # context manager: .measure(seq_len) -> StepMemory
    search.find_max_seq_len(...)  # the longest seq_len under a byte budget
    python -m longtrain.plan      # both, as a table and plan.json

This file imports nothing: `longtrain.config` imports `longtrain.config` (the `plan`
group's dataclass), and the simulation imports the config.
"""
