"""Loading files through ``datasets``, truncation, filtering, validation splits, and
the bad-input errors: one line naming the file, row (or line) and column."""

from __future__ import annotations

import json
import logging

import pytest

from fastune.data import (
    IGNORE_INDEX,
    DataError,
    holdout_split,
    load_rows,
    load_sft_dataset,
    load_tokenizer,
    prompt_answer_pairs,
)

ROWS = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("hi", "yo", "hey", "bye", "ok")]


@pytest.fixture(scope="module")
def tok(hf_dir):
    return load_tokenizer(hf_dir)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_json_csv_parquet_give_the_same_samples(tmp_path, tok, hf_cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [*ROWS, {"instruction": "Price?", "input": "NA", "output": "7.50"}]  # CSV pitfalls
    files = [_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "d.json", tmp_path / "d.csv", tmp_path / "d.parquet"]
    files[1].write_text(json.dumps(rows))
    files[2].write_text("instruction,input,output\n" + "".join(
        f"{r['instruction']},{r['input']},{r['output']}\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), files[3])
    datasets = [load_sft_dataset(f, tok, cache_dir=hf_cache) for f in files]
    for ds in datasets:
        assert len(ds) == len(rows)
        assert ds.tokens.tolist() == datasets[0].tokens.tolist()
        assert ds.labels.tolist() == datasets[0].labels.tolist()
    assert tok.decode(datasets[2][5]["tokens"].tolist()).endswith("NA\nassistant\n7.50\n")


def test_every_file_type_the_config_accepts_loads(tmp_path, tok, hf_cache):
    """The config loader's builders and suffixes are the data pipeline's (arrow included)."""
    import pyarrow as pa

    from fastune.config.loader import _DATA_EXTENSIONS, FILE_BUILDERS
    from fastune.data.datasets import FILE_TYPES

    assert set(FILE_BUILDERS) == set(FILE_TYPES.values()) and set(_DATA_EXTENSIONS) == set(FILE_TYPES)
    table = pa.Table.from_pylist(ROWS)
    arrow = tmp_path / "d.arrow"
    with pa.ipc.new_stream(str(arrow), table.schema) as writer:  # the stream format `datasets` writes
        writer.write_table(table)
    reference = load_sft_dataset(_jsonl(tmp_path / "d.jsonl", ROWS), tok, cache_dir=hf_cache)
    for ds in (load_sft_dataset(arrow, tok, cache_dir=hf_cache),
               load_sft_dataset("arrow", tok, data_files=str(arrow), cache_dir=hf_cache)):
        assert ds.tokens.tolist() == reference.tokens.tolist()
        assert ds.labels.tolist() == reference.labels.tolist()


def test_builder_with_data_files_per_split(tmp_path, tok, hf_cache):
    train, val = _jsonl(tmp_path / "t.jsonl", ROWS), _jsonl(tmp_path / "v.jsonl", ROWS[:2])
    files = {"train": str(train), "validation": [str(val)]}
    assert len(load_sft_dataset("json", tok, data_files=files, cache_dir=hf_cache)) == 5
    assert len(load_sft_dataset("json", tok, split="validation", data_files=files, cache_dir=hf_cache)) == 2
    bad = _jsonl(tmp_path / "bad.jsonl", [{"instruction": "x", "answer": "y"}])
    with pytest.raises(DataError, match=r"bad\.jsonl row 1: missing column 'output'"):
        load_sft_dataset("json", tok, data_files={"train": str(bad)}, cache_dir=hf_cache)
    with pytest.raises(DataError, match="data_files has no 'test' entry"):
        load_rows("json", "test", data_files=files)
    with pytest.raises(DataError, match="data_files needs a builder source"):
        load_rows("my/dataset", data_files=files)


def test_truncation_keeps_the_start_without_adding_eos(tmp_path, tok, hf_cache):
    path = _jsonl(tmp_path / "d.jsonl", [{"instruction": "Say it.", "output": "the quick brown fox " * 5}])
    full = load_sft_dataset(path, tok, max_seq_len=512, cache_dir=hf_cache)
    cut = load_sft_dataset(path, tok, max_seq_len=20, cache_dir=hf_cache)
    tokens, labels = cut[0]["tokens"], cut[0]["labels"]
    assert len(tokens) == 20 and tokens.tolist() == full[0]["tokens"][:20].tolist()  # nothing (no eos) added
    assert labels[:-1].tolist() == full[0]["labels"][:19].tolist() and labels[-1] == IGNORE_INDEX


def test_empty_and_unsupervised_samples_are_dropped_and_counted(tmp_path, tok, hf_cache, caplog):
    long_prompt = {"instruction": "word " * 50, "output": "answer"}  # nothing supervised once cut
    rows = [*ROWS, {"instruction": "x", "output": ""}, {"instruction": "y", "output": None}, long_prompt]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="fastune.data"):
        ds = load_sft_dataset(path, tok, max_seq_len=24, cache_dir=hf_cache)
    assert len(ds) == 5
    assert "5 samples from 8 rows (2 empty dropped, 1 truncated to 24 tokens, " \
           "1 without a supervised token dropped)" in caplog.text


def test_holdout_split_is_deterministic_and_disjoint(tmp_path, tok, hf_cache):
    rows = [{"instruction": "Echo.", "input": str(i), "output": str(i)} for i in range(40)]
    ds = load_sft_dataset(_jsonl(tmp_path / "d.jsonl", rows), tok, cache_dir=hf_cache)
    train, val = holdout_split(ds, 0.25, seed=3)
    again_train, again_val = holdout_split(ds, 0.25, seed=3)
    assert (len(train), len(val)) == (30, 10)
    assert val.tokens.tolist() == again_val.tokens.tolist()
    assert train.tokens.tolist() == again_train.tokens.tolist()
    seen = {tuple(d[i]["tokens"].tolist()) for d, n in ((train, 30), (val, 10)) for i in range(n)}
    assert len(seen) == 40
    assert holdout_split(ds, 0.25, seed=4)[1].tokens.tolist() != val.tokens.tolist()
    assert train.num_tokens + val.num_tokens == ds.num_tokens
    with pytest.raises(DataError, match="between 0 and 1"):
        holdout_split(ds, 1.5)


def test_prompt_answer_pairs(tmp_path, tok, hf_cache):
    pairs = prompt_answer_pairs(_jsonl(tmp_path / "d.jsonl", ROWS), tok, cache_dir=hf_cache)
    assert len(pairs) == 5
    ids, answer = pairs[0]
    assert answer == "hi"
    assert ids == tok.tokenize_messages([{"role": "user", "content": "Say hi."}], add_generation_prompt=True)[0]


# ----------------------------------------------------------------------------- bad input


def test_missing_column(tmp_path, tok, hf_cache):
    path = _jsonl(tmp_path / "d.jsonl", [{"instruction": "x", "answer": "y"}])
    with pytest.raises(DataError, match=r"d\.jsonl row 1: missing column 'output' .*column_map"):
        load_sft_dataset(path, tok, cache_dir=hf_cache)
    with pytest.raises(DataError, match=r"missing column 'response'"):
        load_sft_dataset(path, tok, column_map={"output": "response"}, cache_dir=hf_cache)


def test_non_utf8_file(tmp_path, tok, hf_cache):
    for name in ("d.jsonl", "d.csv"):
        path = tmp_path / name
        header = b"instruction,output\n" if name.endswith("csv") else b""
        row = b'{"instruction": "caf\xe9", "output": "x"}\n' if name.endswith("jsonl") else b"caf\xe9,x\n"
        path.write_bytes(header + b'{"instruction": "a", "output": "b"}\n' * (not header) + row)
        with pytest.raises(DataError, match=rf"{name} line 2, column (21|4): not valid UTF-8 \(byte 0xe9\)"):
            load_sft_dataset(path, tok, cache_dir=hf_cache)


def test_malformed_json_line(tmp_path, tok, hf_cache):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a" "output": "b"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl line 2, column 21: invalid JSON"):
        load_sft_dataset(path, tok, cache_dir=hf_cache)


def test_empty_dataset(tmp_path, tok, hf_cache):
    path = tmp_path / "d.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match=r"d\.jsonl: the dataset is empty \(0 rows\)"):
        load_sft_dataset(path, tok, cache_dir=hf_cache)
    only_empty = _jsonl(tmp_path / "e.jsonl", [{"instruction": "x", "output": ""}])
    with pytest.raises(DataError, match=r"e\.jsonl: no usable samples: 1 of 1 rows are empty"):
        load_sft_dataset(only_empty, tok, cache_dir=hf_cache)


def test_too_long_without_truncation(tmp_path, tok, hf_cache):
    path = _jsonl(tmp_path / "d.jsonl", [*ROWS, {"instruction": "x", "output": "word " * 40}])
    with pytest.raises(DataError, match=r"d\.jsonl row 6: \d+ tokens, more than max_seq_len=32"):
        load_sft_dataset(path, tok, max_seq_len=32, truncation=False, cache_dir=hf_cache)


def test_unknown_chat_role(tmp_path, tok, hf_cache):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}
    path = _jsonl(tmp_path / "d.jsonl", [good, good, bad])
    with pytest.raises(DataError, match=r"d\.jsonl row 3, column 'messages': message 1 has unknown role 'robot'"):
        load_sft_dataset(path, tok, format="chat", cache_dir=hf_cache)


def test_missing_file_unknown_type_and_split(tmp_path, tok):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(DataError, match="unknown data file type '.xml'"):
        load_rows(tmp_path / "d.xml")
    path = _jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(DataError, match="a single file has one split"):
        load_rows(path, "validation")


def test_hub_name_offline(monkeypatch, hf_cache, tok):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as err:
        load_sft_dataset("someone/some-dataset", tok, cache_dir=hf_cache)
    message = str(err.value)
    assert "'someone/some-dataset' is not a local file" in message and "HF_HUB_OFFLINE=1" in message
    assert "\n" not in message
