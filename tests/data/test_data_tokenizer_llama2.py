"""Llama 2 sentencepiece tokenizer against transformers' Llama tokenizer built from the
same ``tokenizer.model`` (legacy mode, as the Llama 2 checkpoints ship), and its
``apply_chat_template`` with Llama-2-chat's template."""

from __future__ import annotations

import pytest
import sentencepiece
from tiny_tokenizers import CHAT, LLAMA2_TEMPLATE, TEXTS

from fastune.data import TokenizerError, load_tokenizer
from fastune.data.tokenizer_llama2 import Llama2Tokenizer


@pytest.fixture(scope="module")
def tok(llama2_dir):
    return load_tokenizer(llama2_dir)


@pytest.fixture(scope="module")
def hf_reference(llama2_dir):
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(str(llama2_dir), legacy=True)


def test_detected_by_content(llama2_dir, tok):
    assert isinstance(tok, Llama2Tokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids, tok.vocab_size) == (1, 2, 0, (2,), 420)
    with pytest.raises(TokenizerError, match="llama3"):
        load_tokenizer(llama2_dir / "tokenizer.model", kind="llama3")


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_sentencepiece_and_transformers(llama2_dir, tok, hf_reference, text):
    ids = tok.encode(text, add_bos=False)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(llama2_dir / "tokenizer.model"))
    assert ids == sp.encode(text)  # Meta's reference: special-token strings are plain text
    # transformers splits on special-token strings, and its Metaspace adds no "▁" before
    # text that already starts with a space (sentencepiece does): compare the rest.
    if "<s>" not in text and not text.startswith(" "):
        assert ids == hf_reference(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.encode(text, add_eos=True) == [1, *ids, 2]


def test_decode_keeps_specials_on_request(tok):
    ids = tok.encode("hi there", add_eos=True)
    assert tok.decode(ids) == "hi there"
    assert tok.decode(ids, skip_special_tokens=False) == "<s>hi there</s>"


@pytest.mark.parametrize("gen", [False, True])
def test_chat_matches_apply_chat_template(tok, hf_reference, gen):
    messages = CHAT[:-1] if gen else CHAT
    ids, mask = tok.tokenize_messages(messages, add_generation_prompt=gen)
    ref = hf_reference.apply_chat_template(messages, chat_template=LLAMA2_TEMPLATE, tokenize=True,
                                           return_dict=True)["input_ids"]
    assert ids == ref
    # Trained: " {answer} </s>" of each turn.
    trained = [i for i, m in zip(ids, mask) if not m]
    ends = [k + 1 for k, i in enumerate(trained) if i == tok.eos_id]
    turns = [trained[a:b] for a, b in zip([0, *ends], ends)]
    answers = [m["content"].strip() for m in messages if m["role"] == "assistant"]
    assert len(turns) == len(answers) and ends[-1] == len(trained)
    for turn, answer in zip(turns, answers):
        assert tok._sp.id_to_piece(turn[0]).startswith("▁")
        assert tok.decode(turn) == f"{answer} "  # decoding drops the leading space


def test_roles_must_alternate(tok):
    with pytest.raises(TokenizerError, match="alternate"):
        tok.tokenize_messages([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(TokenizerError, match="end with a user"):
        tok.tokenize_messages(CHAT, add_generation_prompt=True)
    with pytest.raises(TokenizerError, match="unknown role 'tool'"):
        tok.tokenize_messages([{"role": "tool", "content": "x"}])


def test_not_a_tokenizer_file(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01garbage")
    with pytest.raises(TokenizerError, match="neither a tiktoken rank file nor a sentencepiece model"):
        load_tokenizer(tmp_path)
