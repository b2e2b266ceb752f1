"""Llama 3 tiktoken tokenizer against an independent implementation: transformers'
conversion of the same rank file to a Rust ``tokenizers`` BPE, and its
``apply_chat_template`` with Meta-Llama-3-Instruct's template."""

from __future__ import annotations

import pytest
import tiktoken
from tiny_tokenizers import CHAT, LLAMA3_TEMPLATE, TEXTS

from fastune.data import TokenizerError, load_tokenizer
from fastune.data.tokenizer_llama3 import LLAMA3_PATTERN, Llama3Tokenizer, load_tiktoken_ranks


@pytest.fixture(scope="module")
def tok(llama3_dir):
    return load_tokenizer(llama3_dir)


@pytest.fixture(scope="module")
def hf_reference(llama3_dir, tok):
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    specials = list(tok.special_tokens)
    backend = TikTokenConverter(vocab_file=str(llama3_dir / "tokenizer.model"), pattern=LLAMA3_PATTERN,
                                extra_special_tokens=specials).converted()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                   eos_token="<|eot_id|>")


def test_detected_by_content_and_special_ids(llama3_dir, tok):
    assert isinstance(tok, Llama3Tokenizer)
    assert isinstance(load_tokenizer(llama3_dir / "tokenizer.model", kind="llama3"), Llama3Tokenizer)
    n = tok.num_base_tokens
    assert len(tok.special_tokens) == 256 and tok.vocab_size == n + 256
    # Meta's ids relative to the base vocabulary (128000 in the real tokenizer).
    expected = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|finetune_right_pad_id|>": 4,
                "<|start_header_id|>": 6, "<|end_header_id|>": 7, "<|eom_id|>": 8, "<|eot_id|>": 9,
                "<|python_tag|>": 10, "<|reserved_special_token_3|>": 11, "<|reserved_special_token_247|>": 255}
    assert {k: tok.special_tokens[k] - n for k in expected} == expected
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (n, n + 1, n + 4)
    assert set(tok.stop_ids) == {n + 1, n + 8, n + 9}
    with pytest.raises(TokenizerError, match="llama2"):
        load_tokenizer(llama3_dir, kind="llama2")


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers_conversion(tok, hf_reference, text):
    ids = tok.encode(text, add_bos=False)
    # transformers turns special-token strings into specials; Meta (and fastune) keep them as text.
    if "<|" not in text:
        assert ids == hf_reference(text, add_special_tokens=False)["input_ids"]
    enc = tiktoken.Encoding("ref", pat_str=LLAMA3_PATTERN, mergeable_ranks=tok._enc._mergeable_ranks,
                            special_tokens={})
    assert ids == enc.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=True, add_eos=True) == [tok.bos_id, *ids, tok.eos_id]


def test_special_strings_in_text_stay_text(tok):
    ids = tok.encode("<|eot_id|>", add_bos=False)
    assert tok.eot_id not in ids and len(ids) > 1
    assert tok.decode([tok.bos_id, *ids, tok.eot_id]) == "<|eot_id|>"
    assert tok.decode([tok.bos_id], skip_special_tokens=False) == "<|begin_of_text|>"


def test_long_whitespace_run(tok):
    # tiktoken's regex overflows its stack on a whitespace run of ~1M characters.
    text = "a" + " " * 1_000_000 + "b\n"
    assert tok.decode(tok.encode(text, add_bos=False)) == text


@pytest.mark.parametrize("gen", [False, True])
def test_chat_matches_apply_chat_template(tok, hf_reference, gen):
    messages = CHAT if not gen else CHAT[:-1]
    ids, mask = tok.tokenize_messages(messages, add_generation_prompt=gen)
    ref = hf_reference.apply_chat_template(messages, chat_template=LLAMA3_TEMPLATE, tokenize=True,
                                           add_generation_prompt=gen, return_dict=True)["input_ids"]
    assert ids == ref
    trained = tok.decode([i for i, m in zip(ids, mask) if not m], skip_special_tokens=False)
    answers = [m["content"].strip() + "<|eot_id|>" for m in messages if m["role"] == "assistant"]
    assert trained == "".join(answers)


def test_bad_role_and_bad_file(tok, tmp_path):
    with pytest.raises(TokenizerError, match="unknown role 'bot'"):
        tok.tokenize_messages([{"role": "bot", "content": "hi"}])
    bad = tmp_path / "tokenizer.model"
    bad.write_text("IQ== 0\nnot-base64! 1\n")
    with pytest.raises(TokenizerError, match="line 2"):
        load_tiktoken_ranks(bad)
