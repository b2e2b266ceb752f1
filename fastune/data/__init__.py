"""Data pipeline: tokenizers, dataset formats, tokenization with shifted labels,
packing, collation and a resumable rank-aware loader.

Typical use::

    tok = load_tokenizer(checkpoint_dir)
    train = load_sft_dataset("data.jsonl", tok, format="instruct", max_seq_len=512)
    train, val = holdout_split(train, 0.05, seed=0)
    loader = build_dataloader(train, batch_size=8, seed=0, rank=rank, world_size=world, packed=True)
    for batch in loader:  # tokens, labels [, position_ids, document_ids]
        ...

The names below are imported on first use (PEP 562): the config schema reads the
format registry and the file types without importing torch.
"""

from fastune.lazy import lazy_attributes

# Public name -> module it lives in.
_LAZY = {
    "collate_packed": "fastune.data.collate",
    "collate_padded": "fastune.data.collate",
    "TokenizedDataset": "fastune.data.datasets",
    "holdout_split": "fastune.data.datasets",
    "load_rows": "fastune.data.datasets",
    "load_sft_dataset": "fastune.data.datasets",
    "prompt_answer_pairs": "fastune.data.datasets",
    "tokenize_rows": "fastune.data.datasets",
    "DataError": "fastune.data.errors",
    "TokenizerError": "fastune.data.errors",
    "FORMATS": "fastune.data.formats",
    "IGNORE_INDEX": "fastune.data.formats",
    "SFTDataLoader": "fastune.data.loader",
    "build_dataloader": "fastune.data.loader",
    "greedy_pack": "fastune.data.packing",
    "load_tokenizer": "fastune.data.tokenizer",
    "Message": "fastune.data.tokenizer_base",
    "Tokenizer": "fastune.data.tokenizer_base",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_attributes(__name__, _LAZY)
