"""GPU/CPU side of segq: Celery tasks, inference engines, the model and the per-GPU launcher."""
