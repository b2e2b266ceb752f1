"""Tiny tokenizers built in the test session (nothing downloaded): a Llama 3 tiktoken
rank file, a Llama 2 sentencepiece model, and a Hugging Face byte-level BPE."""

from __future__ import annotations

import base64
import json

import pytest
from tiny_tokenizers import CHATML_TEMPLATE, CORPUS


@pytest.fixture(scope="session")
def llama3_dir(tmp_path_factory):
    """A checkpoint folder with a Llama 3 style tiktoken ``tokenizer.model``."""
    from tiktoken._educational import bpe_train

    from fastune.data.tokenizer_llama3 import LLAMA3_PATTERN

    ranks = bpe_train("\n".join(CORPUS * 4), vocab_size=300, pat_str=LLAMA3_PATTERN, visualise=None)
    folder = tmp_path_factory.mktemp("llama3")
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in sorted(ranks.items(), key=lambda x: x[1])]
    (folder / "tokenizer.model").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="session")
def llama2_dir(tmp_path_factory):
    """A checkpoint folder with a sentencepiece BPE ``tokenizer.model`` set up like Llama 2's."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("llama2")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_prefix=str(folder / "tokenizer"), vocab_size=420,
        model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink()
    return folder


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """A checkpoint folder with a byte-level BPE ``tokenizer.json`` and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<|begin_of_text|>", "<|im_start|>", "<|im_end|>", "<|eot_id|>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    folder = tmp_path_factory.mktemp("hf")
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": {"content": "<|im_end|>", "__type": "AddedToken"}, "pad_token": "<pad>",
              "clean_up_tokenization_spaces": False, "chat_template": CHATML_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def hf_cache(tmp_path):
    """Keep ``datasets``' arrow cache out of the home folder."""
    return str(tmp_path / "hf_cache")
