"""Training on Ray + DeepSpeed: one engine, one loop, checkpoints and tracking, driven by `jobs/*.py`.

Modules: `deepspeed_config` (the DeepSpeed JSON from the typed config), `schedule` (warmup + decay), `engine`
(DeepSpeed ZeRO 0-3 around the gradient cache: one optimizer step per global batch), `checkpoint` (Ray Train
checkpoints, resume, fp32 consolidation), `loop` (`Trainer.train()`), `tracking` / `mlflow_tracker` (metrics),
`packaged` (`pkg:` model references), `ray_trainer` (the TorchTrainer: driver checks and the worker function).
Nothing heavy is imported here: the driver of a job stays light until it launches.
"""
