"""``fastune eval``: run lm-evaluation-harness tasks on a checkpoint.

The settings are those of torchtune's eval config: ``tasks``, ``limit`` (documents
per task), ``batch_size`` and ``max_seq_length``, plus lm-eval's ``num_fewshot``
and ``apply_chat_template``. Besides lm-eval's own tasks, the tasks in
``fastune/assets/demo/eval`` (``fastune_demo_choice``, ``fastune_demo_answer``, tag
``fastune_demo``) and any folder of task YAMLs given in ``include_paths`` are known.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from fastune.eval.errors import EvalError

DEMO_TASKS = ("fastune_demo_choice", "fastune_demo_answer")


def demo_tasks_dir() -> Path:
    return Path(str(importlib.resources.files("fastune") / "assets" / "demo" / "eval"))


def evaluate(
    checkpoint: Union[str, Path],
    tasks: Sequence[str],
    limit: Optional[float] = None,
    batch_size: int = 8,
    max_seq_length: int = 4096,
    num_fewshot: Optional[int] = None,
    apply_chat_template: bool = False,
    include_paths: Sequence[Union[str, Path]] = (),
    dtype: str = "bf16",
    device: Union[str, torch.device] = "cpu",
    compile: bool = False,
) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` results for ``checkpoint`` (see ``load_for_inference``
    for what it may be): ``results[task][metric]`` and more."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalError("fastune eval needs lm-evaluation-harness: pip install 'fastune[eval]'") from None
    from fastune.eval.lm import FastuneLM
    from fastune.generation import load_for_inference

    if not tasks:
        raise EvalError("--tasks: name at least one task")
    for path in include_paths:
        if not Path(path).is_dir():
            raise EvalError(f"--include-path: {path} is not a directory")
    task_manager = _task_manager(TaskManager, tasks, [demo_tasks_dir(), *map(Path, include_paths)])
    model, tokenizer, _ = load_for_inference(checkpoint, dtype=dtype, device=device)
    lm = FastuneLM(model, tokenizer, max_seq_length=max_seq_length, batch_size=batch_size, compile=compile)
    return simple_evaluate(
        model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=task_manager,
        apply_chat_template=apply_chat_template, log_samples=False,
    )


def _task_manager(task_manager_cls, tasks: Sequence[str], include_paths: list[Path]):
    """A TaskManager that knows ``tasks``. lm-eval's own thousands of task files are
    indexed only when a task is not among ``include_paths`` (indexing takes seconds)."""
    from fastune.config.schema import did_you_mean

    local = task_manager_cls(include_path=[str(p) for p in include_paths], include_defaults=False)
    if all(t in local.all_tasks for t in tasks):
        return local
    full = task_manager_cls(include_path=[str(p) for p in include_paths])
    for task in tasks:
        if task not in full.all_tasks:
            raise EvalError(f"--tasks: unknown task {task!r}{did_you_mean(task, full.all_tasks)}; "
                            "`lm-eval ls tasks` lists lm-eval's tasks")
    return full


def metric_table(results: dict[str, Any]) -> str:
    """The results as lm-eval prints them (a markdown table)."""
    from lm_eval.utils import make_table

    return make_table(results)
