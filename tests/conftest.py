import os

# Triton's interpreter must be chosen before triton is first imported, so that
# kernels can run on CPU tensors in the interpreter tests.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
