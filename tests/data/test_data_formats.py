"""Rows to messages (instruct / chat / ShareGPT / text), masking and label shifting."""

from __future__ import annotations

import numpy as np
import pytest

from fastune.data import DataError, load_tokenizer, tokenize_rows
from fastune.data.formats import IGNORE_INDEX, RowError, resolve_columns, row_to_sample, shift_labels


def _sample(fmt, row, column_map=None, system_prompt=None):
    columns = resolve_columns(fmt, column_map, list(row), "f.jsonl")
    return row_to_sample(fmt, row, columns, system_prompt)


def test_instruct_alpaca_and_column_map():
    row = {"instruction": "Add.", "input": "2 + 3", "output": 5}
    assert _sample("instruct", row) == [{"role": "user", "content": "Add.\n\n2 + 3"},
                                        {"role": "assistant", "content": "5"}]
    row = {"prompt": "Say hi.", "response": "hi"}
    assert _sample("instruct", row, {"instruction": "prompt", "output": "response"}, "Be brief.") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "hi"}]
    with pytest.raises(DataError, match="column_map key 'answer' is not a field"):
        _sample("instruct", row, {"answer": "response"})


def test_chat_openai_and_sharegpt():
    openai = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    sharegpt = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"},
                                  {"from": "gpt", "value": "yo"}]}
    assert _sample("chat", openai) == openai["messages"]
    assert _sample("chat", sharegpt) == [{"role": "system", "content": "s"}, *openai["messages"]]
    with pytest.raises(RowError, match="unknown from 'bot'"):
        _sample("chat", {"conversations": [{"from": "bot", "value": "x"}]})
    with pytest.raises(RowError, match="expected a list of messages"):
        _sample("chat", {"messages": "hello"})


def test_empty_samples_are_none():
    assert _sample("instruct", {"instruction": "x", "output": "  "}) is None
    assert _sample("instruct", {"instruction": "x", "output": None}) is None
    assert _sample("chat", {"messages": [{"role": "user", "content": "only a question"}]}) is None
    assert _sample("text", {"text": "\n"}) is None


def test_shift_labels_never_cross_samples():
    tokens = np.array([10, 11, 12, 13, 20, 21, 22], dtype=np.int32)
    mask = np.array([1, 1, 0, 0, 1, 0, 0], dtype=bool)  # 1 = not trained
    offsets = np.array([0, 4, 7])
    assert shift_labels(tokens, mask, offsets).tolist() == [
        IGNORE_INDEX, 12, 13, IGNORE_INDEX, 21, 22, IGNORE_INDEX]


@pytest.mark.parametrize("train_on_input", [False, True])
def test_labels_of_an_instruct_sample(hf_dir, train_on_input):
    tok = load_tokenizer(hf_dir)
    row = {"instruction": "Add.", "input": "2 + 3", "output": "five"}
    ds = tokenize_rows([row], tok, train_on_input=train_on_input)
    tokens, labels = ds[0]["tokens"], ds[0]["labels"]
    ids, mask = tok.tokenize_messages(_sample("instruct", row))
    assert tokens.tolist() == ids
    targets = [t for t, m in zip(ids[1:], mask[1:]) if train_on_input or not m]
    assert [y for y in labels.tolist() if y != IGNORE_INDEX] == targets
    assert labels[-1] == IGNORE_INDEX
    # labels[i] is the target of tokens[i]: the next token wherever it is supervised.
    for i in range(len(ids) - 1):
        assert labels[i] in (IGNORE_INDEX, tokens[i + 1])
    if not train_on_input:
        supervised = [y for y in labels.tolist() if y != IGNORE_INDEX]
        assert tok.decode(supervised, skip_special_tokens=False) == "five<|im_end|>\n"  # ChatML


def test_text_format_trains_on_everything_between_bos_and_eos(hf_dir):
    tok = load_tokenizer(hf_dir)
    sample = tokenize_rows([{"text": "The quick brown fox."}], tok, format="text")[0]
    tokens, labels = sample["tokens"], sample["labels"]
    assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
    assert labels.tolist() == [*tokens[1:].tolist(), IGNORE_INDEX]
