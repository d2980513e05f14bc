"""Sharded training engines besides FSDP2 (which lives in `longtrain.parallelize`)."""
