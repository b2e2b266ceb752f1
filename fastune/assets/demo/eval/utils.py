"""Documents of the demo eval tasks: the held-out demo examples in ``../data/eval.jsonl``
(written by ``fastune.data.demo``, never trained on).

lm-eval imports this file through ``!function utils.<name>`` in the task YAMLs.
"""

import json
from pathlib import Path

import datasets

DATA = Path(__file__).resolve().parent.parent / "data" / "eval.jsonl"
# Tasks whose answer is the input's letters, in capitals for "uppercase" only.
WORD_TASKS = ("uppercase", "reverse", "sort")


def load(**_metadata) -> datasets.DatasetDict:
    """The examples as a ``test`` split (lm-eval passes the task's metadata; unused)."""
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def with_case_choices(dataset: datasets.Dataset) -> datasets.Dataset:
    """The word-task examples, each with two choices: the answer (label 0), and the
    answer in the other case. Picking the right one needs no arithmetic or recall,
    only the instruction followed, which a small model learns in a short fine-tune.
    A model that ignores the instruction and prefers one case scores 1/3 or 2/3
    (40 examples of each task ask for capitals in one task of three)."""

    def add_choices(doc):
        answer = doc["output"]
        other = answer.lower() if doc["task"] == "uppercase" else answer.upper()
        return {"choices": [answer, other], "label": 0}

    return dataset.filter(lambda doc: doc["task"] in WORD_TASKS).map(add_choices)
