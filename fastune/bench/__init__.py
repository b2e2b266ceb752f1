"""``fastune bench`` and ``fastune plan``: measuring speed and memory, and planning memory.

- ``measure``: timing, peak memory of a step, the CPU's peak FLOP/s, child processes.
- ``kernels``: each fused op against eager PyTorch and torch.compile (``bench kernels``).
- ``train``: whole training steps against fastune eager and HF + PEFT (``bench train``);
  each configuration runs in a ``train_worker`` process, ``train_report`` turns the
  numbers into rates, ratios and the report.
- ``plan``: peak GPU memory of a config from one step on fake tensors (``plan``), counted
  by ``fastune.training.memory_tracker``.
- ``profiles``: hardware profiles (``profiles/*.yaml``).
- ``report``: JSON, markdown and PNG reports.
"""
