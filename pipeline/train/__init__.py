"""Training: DeepSpeed ZeRO-2 engine and loop (engine.py), lr schedule, atomic checkpoints,
MLflow + metrics.jsonl tracking, pre-emption signals. Knows nothing of TomeFormer internals."""
