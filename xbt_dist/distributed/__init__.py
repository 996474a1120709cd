"""Distributed execution: Ray Train jobs whose workers wrap the trainable model in DeepSpeed.

- `deepspeed_backend`: `DeepSpeedBackend` (the `Backend` protocol on a DeepSpeed engine, ZeRO 0-3)
  and `make_deepspeed_backend(dist_cfg)`, the `WorkerContext.make_backend` factory.
- `ray_runner`: `run_on_ray(stage_fn, cfg, resume)` runs a stage function on N Ray Train workers.
- `embed_job`: `embed_on_ray(...)`, `xbt embed` with shards spread over Ray tasks.

Only this package imports ray and deepspeed, and only inside functions, so importing it is cheap
and DS_ACCELERATOR can still be set before deepspeed loads.
"""
