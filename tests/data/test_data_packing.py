"""Packing and collation; with the model: packed documents never see each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastune.data import IGNORE_INDEX, collate_packed, collate_padded, greedy_pack
from fastune.data.formats import shift_labels


def _doc(tokens, first_trained=0):
    tokens = np.asarray(tokens, dtype=np.int32)
    mask = np.arange(len(tokens)) < first_trained
    return {"tokens": tokens, "labels": shift_labels(tokens, mask, np.array([0, len(tokens)]))}


def test_greedy_pack_keeps_order_and_fits():
    lengths = np.array([5, 3, 8, 2, 7, 1, 6])
    order = np.array([6, 0, 1, 2, 3, 4, 5])
    packs = greedy_pack(lengths, order, max_seq_len=10)
    assert [p.tolist() for p in packs] == [[6], [0, 1], [2, 3], [4, 5]]
    assert all(lengths[p].sum() <= 10 for p in packs)


def test_collate_padded():
    a, b = _doc([5, 6, 7, 8, 9], first_trained=2), _doc([3, 4])
    batch = collate_padded([a, b], pad_id=0, pad_to_multiple_of=8)
    assert batch["tokens"].dtype == torch.int64 and batch["tokens"].shape == (2, 8)
    assert batch["tokens"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0], [3, 4, 0, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 7, 8, 9, -100, -100, -100, -100], [4] + [-100] * 7]
    assert int(batch["num_tokens"]) == 7
    assert collate_padded([a, b], pad_id=0)["tokens"].shape == (2, 5)


def test_collate_packed_restarts_positions_and_isolates_padding():
    a, b = _doc([5, 6, 7], first_trained=2), _doc([8, 9])
    batch = collate_packed([[a, b], [b]], pad_id=0, seq_len=7)
    assert batch["tokens"].tolist() == [[5, 6, 7, 8, 9, 0, 0], [8, 9, 0, 0, 0, 0, 0]]
    # A document's last label is -100: nothing predicts across a boundary.
    assert batch["labels"].tolist() == [[-100, 7, -100, 9, -100, -100, -100], [9] + [-100] * 6]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1], [0, 1, 0, 1, 2, 3, 4]]
    assert batch["document_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 1, 1, 1]]
    assert int(batch["num_tokens"]) == 7


def _tiny_model():
    from fastune.models import ModelConfig, Transformer

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return Transformer(config).eval()


def _token_losses(model, batch):
    logits = model(batch["tokens"], position_ids=batch["position_ids"], document_ids=batch["document_ids"])
    return logits, torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), batch["labels"].flatten(), reduction="none").view(batch["labels"].shape)


@torch.no_grad()
def test_no_leakage_between_packed_documents():
    model = _tiny_model()
    rng = np.random.default_rng(0)
    doc_a, doc_a2 = _doc(rng.integers(1, 64, 9)), _doc(rng.integers(1, 64, 9))
    doc_b = _doc(rng.integers(1, 64, 11), first_trained=3)
    seq_len = 24
    logits, losses = _token_losses(model, collate_packed([[doc_a, doc_b]], 0, seq_len))
    logits2, losses2 = _token_losses(model, collate_packed([[doc_a2, doc_b]], 0, seq_len))
    b = slice(9, 20)
    assert not torch.allclose(logits[0, :9], logits2[0, :9])  # A changed...
    torch.testing.assert_close(logits2[0, b], logits[0, b], atol=1e-6, rtol=0)  # ...B did not
    torch.testing.assert_close(losses2[0, b], losses[0, b], atol=1e-6, rtol=0)
    # And B packed after A computes what B computes alone, from position 0.
    alone = model(torch.as_tensor(doc_b["tokens"], dtype=torch.long)[None])
    torch.testing.assert_close(logits[0, b], alone[0], atol=1e-5, rtol=1e-5)
    # A's last token has no target: B's first token is never predicted from A.
    assert int(collate_packed([[doc_a, doc_b]], 0, seq_len)["labels"][0, 8]) == IGNORE_INDEX
    assert losses[0, 8] == 0


@pytest.mark.parametrize("packed", [False, True])
def test_batches_feed_the_model(packed):
    model = _tiny_model()
    docs = [_doc(np.arange(1, n + 1)) for n in (4, 7, 3)]
    batch = collate_packed([docs], 0, 16) if packed else collate_padded(docs, 0)
    keys = ("position_ids", "document_ids") if packed else ()
    logits = model(batch["tokens"], **{k: batch[k] for k in keys})
    assert logits.shape[:2] == batch["labels"].shape and torch.isfinite(logits).all()


def test_samples_carry_named_fields_through_dataset_loader_and_collators():
    """A field besides tokens and labels (here a second label row, as another objective
    might carry) is sliced, subset, padded and packed like them."""
    from fastune.data import TokenizedDataset, build_dataloader

    tokens = np.array([5, 6, 7, 8, 9], dtype=np.int32)
    labels = np.array([6, 7, -100, 9, -100], dtype=np.int32)
    ref = np.array([1, 2, -100, 3, -100], dtype=np.int32)
    ds = TokenizedDataset({"tokens": tokens, "labels": labels, "ref_labels": ref}, np.array([0, 3, 5]),
                          source="mem", max_seq_len=8, pad_id=0)
    assert ds[1]["ref_labels"].tolist() == [3, -100]
    assert ds.subset([1])[0]["ref_labels"].tolist() == [3, -100]
    padded = collate_padded([ds[0], ds[1]], pad_id=0)
    assert padded["ref_labels"].tolist() == [[1, 2, -100], [3, -100, -100]]  # *_labels pad with -100
    assert padded["tokens"].tolist() == [[5, 6, 7], [8, 9, 0]] and int(padded["num_tokens"]) == 5
    packed = collate_packed([[ds[0], ds[1]]], pad_id=0, seq_len=6)
    assert packed["ref_labels"].tolist() == [[1, 2, -100, 3, -100, -100]]
    assert packed["document_ids"].tolist() == [[0, 0, 0, 1, 1, 2]]
    batch = next(iter(build_dataloader(ds, batch_size=2, seed=0)))
    assert set(batch) == {"tokens", "labels", "ref_labels", "num_tokens"}
    with pytest.raises(ValueError, match="as long as the samples"):
        TokenizedDataset({"tokens": tokens, "labels": labels[:4]}, np.array([0, 5]), source="mem",
                         max_seq_len=8, pad_id=0)
