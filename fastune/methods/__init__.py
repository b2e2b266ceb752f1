"""Methods and the one model builder: ``method.py`` (full fine-tuning, LoRA with its DoRA
and QLoRA options: how each adapts a model, what it trains, saves and resumes) and
``build.py`` (``build_model``, used by training, the sharded path, the planner,
generation and quantization)."""
