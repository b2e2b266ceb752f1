"""Data pipeline: tokenizers, dataset formats, tokenization with shifted labels,
packing, collation and a resumable rank-aware loader.

Typical use::

    tok = load_tokenizer(checkpoint_dir)
    train = load_sft_dataset("data.jsonl", tok, format="instruct", max_seq_len=512)
    train, val = holdout_split(train, 0.05, seed=0)
    loader = build_dataloader(train, batch_size=8, seed=0, rank=rank, world_size=world, packed=True)
    for batch in loader:  # tokens, labels [, position_ids, document_ids]
        ...
"""

from fastune.data.collate import collate_packed, collate_padded
from fastune.data.datasets import (
    TokenizedDataset,
    holdout_split,
    load_rows,
    load_sft_dataset,
    prompt_answer_pairs,
    tokenize_rows,
)
from fastune.data.errors import DataError, TokenizerError
from fastune.data.formats import FORMATS, IGNORE_INDEX
from fastune.data.loader import SFTDataLoader, build_dataloader
from fastune.data.packing import greedy_pack
from fastune.data.tokenizer import Message, Tokenizer, load_tokenizer

__all__ = [
    "DataError", "FORMATS", "IGNORE_INDEX", "Message", "SFTDataLoader", "TokenizedDataset",
    "Tokenizer", "TokenizerError", "build_dataloader", "collate_packed", "collate_padded",
    "greedy_pack", "holdout_split", "load_rows", "load_sft_dataset", "load_tokenizer",
    "prompt_answer_pairs", "tokenize_rows",
]
