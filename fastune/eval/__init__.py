"""Evaluation through EleutherAI's lm-evaluation-harness (the optional ``eval`` extra).

    results = evaluate("out/epoch_0", ["fastune_demo_choice"], limit=50, apply_chat_template=True)
    results["results"]["fastune_demo_choice"]["acc,none"]

``FastuneLM`` (in ``fastune.eval.lm``, which imports lm_eval) is the model class.
"""

from fastune.eval.errors import EvalError
from fastune.eval.run import DEMO_TASKS, demo_tasks_dir, evaluate, metric_table

__all__ = ["DEMO_TASKS", "EvalError", "demo_tasks_dir", "evaluate", "metric_table"]
