"""The training loop and what it writes.

loop.py         start a run (data, model, optimizer, resume), then step until done
step.py         one optimizer step: shard, forward with the tiled loss, backward, update
optimizer.py    AdamW and the learning-rate schedule
checkpoint.py   exactly-resumable DCP checkpoints; manifest.py their checksums
metrics.py      metrics.jsonl, the progress line, wandb;  plot.py  metrics.png
diagnostics.py  heartbeat, failure and hang reports naming rank, step and operation
run_dir.py      the run directory every rank agrees on, and what may not be mixed into it
"""
