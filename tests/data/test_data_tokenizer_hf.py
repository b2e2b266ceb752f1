"""HF tokenizer.json + Jinja chat template against transformers: encodings, and
``apply_chat_template`` ids and assistant masks (from its ``{% generation %}`` marks)."""

from __future__ import annotations

import json
import shutil

import pytest
from tiny_tokenizers import CHAT, LLAMA3_TEMPLATE, TEXTS

from fastune.data import TokenizerError, load_tokenizer
from fastune.data.tokenizer_hf import HFTokenizer


@pytest.fixture(scope="module")
def tok(hf_dir):
    return load_tokenizer(hf_dir)


@pytest.fixture(scope="module")
def hf_reference(hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir))


def _copy(hf_dir, tmp_path, config_update=None, **files):
    """The fixture's tokenizer folder with changed tokenizer_config keys or extra files."""
    folder = tmp_path / "tok"
    shutil.copytree(hf_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(config_update or {})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text)
    return folder


def test_special_tokens_from_config(tok):
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids) == (0, 2, 4, (2,))
    assert tok.vocab_size == 400


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok, hf_reference, text):
    assert tok.encode(text) == hf_reference(text)["input_ids"]  # bos from the post-processor
    ids = tok.encode(text, add_bos=False)
    assert ids == hf_reference(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == hf_reference.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == hf_reference.decode(ids)


def test_special_strings_become_specials(tok):
    assert tok.encode("a<|im_end|>b", add_bos=False)[1] == tok.eos_id


@pytest.mark.parametrize("gen", [False, True])
def test_chat_ids_and_mask_match_apply_chat_template(tok, hf_reference, gen):
    messages = CHAT[:-1] if gen else CHAT
    ids, mask = tok.tokenize_messages(messages, add_generation_prompt=gen)
    ref = hf_reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen,
                                           return_dict=True, return_assistant_tokens_mask=True)
    assert ids == ref["input_ids"]
    assert [not m for m in mask] == [bool(m) for m in ref["assistant_masks"]]
    assert tok.render(messages, gen) == hf_reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=gen)


def test_llama3_template_masks_content_and_eot(hf_dir, tmp_path, hf_reference):
    folder = _copy(hf_dir, tmp_path, {"chat_template": LLAMA3_TEMPLATE.replace("<|eot_id|>", "<|im_end|>")})
    tok = load_tokenizer(folder)
    ids, mask = tok.tokenize_messages(CHAT)
    trained = tok.decode([i for i, m in zip(ids, mask) if not m], skip_special_tokens=False)
    assert trained == "".join(m["content"].strip() + "<|im_end|>" for m in CHAT if m["role"] == "assistant")
    assert ids == hf_reference.apply_chat_template(CHAT, chat_template=tok.chat_template, tokenize=True,
                                                   return_dict=True)["input_ids"]


def test_template_sources_and_stop_ids(hf_dir, tmp_path):
    jinja = "{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
    folder = _copy(hf_dir, tmp_path, chat_template__jinja=jinja,
                   generation_config__json=json.dumps({"eos_token_id": [2, 3]}))
    tok = load_tokenizer(folder)
    assert tok.chat_template == jinja  # chat_template.jinja wins over tokenizer_config.json
    assert tok.stop_ids == (2, 3)
    listed = _copy(hf_dir, tmp_path / "b", {"chat_template": [{"name": "tool_use", "template": "x"},
                                                             {"name": "default", "template": jinja}]})
    assert load_tokenizer(listed).chat_template == jinja


def test_template_errors_are_one_line(hf_dir, tmp_path):
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
    tok = load_tokenizer(_copy(hf_dir, tmp_path / "a", {"chat_template": strict}))
    with pytest.raises(TokenizerError, match="chat_template: first must be user"):
        tok.tokenize_messages(CHAT)
    # A template that drops earlier assistant turns once a later one exists.
    last_only = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                 "{{ m['content'] }}{% endif %}{% endfor %}")
    tok = load_tokenizer(_copy(hf_dir, tmp_path / "b", {"chat_template": last_only}))
    with pytest.raises(TokenizerError, match="renders earlier turns differently"):
        tok.tokenize_messages(CHAT)
    with pytest.raises(TokenizerError, match="line 1"):
        load_tokenizer(_copy(hf_dir, tmp_path / "c", {"chat_template": "{% for %}"}))
    tok = load_tokenizer(_copy(hf_dir, tmp_path / "d", {"chat_template": None}))
    with pytest.raises(TokenizerError, match="no chat_template"):
        tok.tokenize_messages(CHAT)


@pytest.mark.parametrize("escape", ["{{ messages.__class__.__mro__[1].__subclasses__() }}",
                                    "{% set ns = namespace(_x=1) %}"])
def test_sandbox_blocks_python_internals(hf_dir, tmp_path, escape):
    tok = load_tokenizer(_copy(hf_dir, tmp_path, {"chat_template": escape}))
    with pytest.raises(TokenizerError, match="chat_template"):
        tok.render(CHAT)


def test_bad_files(hf_dir, tmp_path):
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        load_tokenizer(_copy(hf_dir, tmp_path / "a", {"eos_token": "<nope>"}))
    folder = _copy(hf_dir, tmp_path / "b")
    (folder / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        load_tokenizer(folder)
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="no such tokenizer"):
        load_tokenizer(tmp_path / "missing")


def _qwen3_template() -> str:
    """Qwen3's own chat template, as trl ships it (skipped without trl)."""
    from importlib import resources

    trl = pytest.importorskip("trl")
    return (resources.files(trl) / "chat_templates" / "qwen3.jinja").read_text()


def test_qwen3_thinking_template_masks_every_assistant_turn(hf_dir, tmp_path, hf_reference):
    """Qwen3 drops the <think> block of assistant turns before the last user message;
    each turn is trained as the whole conversation renders it."""
    folder = _copy(hf_dir, tmp_path, {"chat_template": _qwen3_template()})
    tok = load_tokenizer(folder)
    chat = [dict(m) for m in CHAT]
    chat[2]["content"] = "<think>\nadd them\n</think>\n\nFour, of course. 😀"
    chat[4]["content"] = "<think>\nsix\n</think>\n\nSix.\n\nDone."
    ids, mask = tok.tokenize_messages(chat)
    assert ids == hf_reference.apply_chat_template(chat, chat_template=tok.chat_template, tokenize=True,
                                                   return_dict=True)["input_ids"]
    trained = tok.decode([i for i, m in zip(ids, mask) if not m], skip_special_tokens=False)
    assert trained == ("Four, of course. 😀<|im_end|>\n"
                       "<think>\nsix\n</think>\n\nSix.\n\nDone.<|im_end|>\n")
    # With a generation prompt every assistant turn is an earlier one.
    ids, mask = tok.tokenize_messages(chat[:-1], add_generation_prompt=True)
    trained = tok.decode([i for i, m in zip(ids, mask) if not m], skip_special_tokens=False)
    assert trained == "Four, of course. 😀<|im_end|>\n"
