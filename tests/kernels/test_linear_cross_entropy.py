"""linear_cross_entropy: reference vs float64, Triton path (interpreter) vs reference, bf16
rule, frozen and tied weights, ignored tokens, memory, compile, bad input.

The Triton path's kernel is the per-chunk cross-entropy (no tl.dot; the matmuls are
torch's), so bf16 runs under the interpreter as it is."""

import pytest
import torch
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastune.kernels.dispatch import force_triton
from fastune.kernels.linear_cross_entropy import (
    LOGITS_BUDGET, _chunked_forward, _supervised_rows_forward, default_chunk_size,
    linear_cross_entropy)
from tests.kernels.numerics import assert_close_to_truth, fwd_bwd, to_float64
from tests.kernels.test_cross_entropy import IGNORE, assert_within_bf16_rule, eager_cross_entropy

# (tokens shape, hidden, vocab): odd sizes, a [batch, seq] shape, round sizes.
SHAPES = [((67,), 37, 1003), ((3, 5), 37, 67), ((64,), 64, 1024)]
# (chunk_size, label_smoothing, z_loss): one chunk and plain; a ragged last chunk with both
# options.
VARIANTS = [(None, 0.0, 0.0), (16, 0.2, 1e-2)]
GRAD_NAMES = ["grad hidden", "grad weight"]


def make_case(tokens_shape, hidden_size, vocab, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*tokens_shape, hidden_size, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size ** 0.5).to(dtype)
    labels = torch.randint(0, vocab, tokens_shape, generator=gen)
    labels[torch.rand(tokens_shape, generator=gen) < 0.25] = IGNORE
    return hidden, weight, labels


def eager(labels, label_smoothing=0.0, z_loss=0.0):
    return lambda h, w: eager_cross_entropy(F.linear(h, w), labels, label_smoothing, z_loss)


def ours(labels, label_smoothing=0.0, z_loss=0.0, chunk_size=None, triton=False):
    def fn(hidden, weight):
        with force_triton(triton):
            loss, _ = linear_cross_entropy(hidden, weight, labels, z_loss=z_loss,
                                           label_smoothing=label_smoothing,
                                           chunk_size=chunk_size)
        return loss
    return fn


@pytest.mark.parametrize("tokens_shape,hidden_size,vocab", SHAPES)
@pytest.mark.parametrize("chunk_size,label_smoothing,z_loss", VARIANTS)
def test_reference_matches_float64(tokens_shape, hidden_size, vocab, chunk_size,
                                   label_smoothing, z_loss):
    """fp32, random upstream gradient (so backward's scaling is checked too)."""
    inputs = make_case(tokens_shape, hidden_size, vocab, torch.float32)
    labels = inputs[2]
    out = fwd_bwd(ours(labels, label_smoothing, z_loss, chunk_size), inputs[:2])
    truth = fwd_bwd(eager(labels, label_smoothing, z_loss), to_float64(inputs[:2]),
                    grad_dtype=torch.float32)
    assert_close_to_truth(out[0] + out[1], truth[0] + truth[1], rtol=1e-5, atol=1e-5,
                          names=["loss"] + GRAD_NAMES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens_shape,hidden_size,vocab", SHAPES)
@pytest.mark.parametrize("chunk_size,label_smoothing,z_loss", VARIANTS)
def test_kernel_and_reference_within_bf16_rule(dtype, tokens_shape, hidden_size, vocab,
                                               chunk_size, label_smoothing, z_loss):
    """Both paths vs float64, bounded by eager F.linear + F.cross_entropy in the same dtype
    (unit upstream gradient: see tests/kernels/test_cross_entropy.py)."""
    hidden, weight, labels = make_case(tokens_shape, hidden_size, vocab, dtype)
    eager_out = fwd_bwd(eager(labels, label_smoothing, z_loss), [hidden, weight], unit=True)
    truth = fwd_bwd(eager(labels, label_smoothing, z_loss), to_float64([hidden, weight]),
                    unit=True)
    for triton in (False, True):
        out = fwd_bwd(ours(labels, label_smoothing, z_loss, chunk_size, triton),
                      [hidden, weight], unit=True)
        assert [g.dtype for g in out[1]] == [dtype, dtype]
        assert_within_bf16_rule(out[0] + out[1], eager_out[0] + eager_out[1],
                                truth[0] + truth[1], GRAD_NAMES)


@pytest.mark.parametrize("chunk_size", [None, 16, 100])
def test_only_supervised_rows_are_computed(chunk_size):
    """A mostly masked batch (prompts): the supervised rows, padded up to a bucket of 64
    rows, are the only ones in the GEMMs; loss and both gradients still equal eager's.
    chunk_size 100: all 300 rows would take several chunks, the kept ones take one (dW
    then still comes back in the dtype promised for the whole batch)."""
    hidden, weight, labels = make_case((300,), 24, 211, torch.float32, seed=3)
    labels[torch.rand(300, generator=torch.Generator().manual_seed(4)) < 0.85] = IGNORE
    assert 0 < int((labels != IGNORE).sum()) < 64
    with _OutputShapes() as ops:
        _supervised_rows_forward(hidden, weight, labels, IGNORE, 0.0, 0.0,
                                 chunk_size or default_chunk_size(300, 211), True, True, False)
    assert (min(64, chunk_size or 64), 211) in ops.shapes  # the chunk's logits
    assert not any(shape[0] == 300 for shape in ops.shapes if len(shape) == 2 and shape[1] != 24)

    out = fwd_bwd(ours(labels, chunk_size=chunk_size), [hidden, weight])
    truth = fwd_bwd(eager(labels), to_float64([hidden, weight]), grad_dtype=torch.float32)
    assert_close_to_truth(out[0] + out[1], truth[0] + truth[1], rtol=1e-5, atol=1e-6,
                          names=["loss"] + GRAD_NAMES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(dtype):
    hidden, weight, labels = make_case((3, 5), 37, 67, dtype)
    ref = fwd_bwd(ours(labels, 0.1, 1e-3, chunk_size=4), [hidden, weight])
    kernel = fwd_bwd(ours(labels, 0.1, 1e-3, chunk_size=4, triton=True), [hidden, weight])
    torch.testing.assert_close(kernel, ref)


class _OutputShapes(TorchDispatchMode):
    """Records the shape of every tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes.update(tuple(t.shape) for t in tree_leaves(out) if torch.is_tensor(t))
        return out


@pytest.mark.parametrize("triton", [False, True])
def test_frozen_weight_gets_no_gradient(triton):
    hidden, weight, labels = make_case((67,), 37, 1003, torch.float32)
    trained = fwd_bwd(ours(labels, chunk_size=16, triton=triton), [hidden, weight])
    frozen = fwd_bwd(lambda h, w: ours(labels, chunk_size=16, triton=triton)(h, w.detach()),
                     [hidden, weight])
    assert frozen[1][1] is None
    torch.testing.assert_close(frozen[0] + frozen[1][:1], trained[0] + trained[1][:1],
                               rtol=0, atol=0)


@pytest.mark.parametrize("triton", [False, True])
def test_frozen_weight_gradient_is_never_formed(triton):
    """Inside the op (opaque to dispatch modes from outside, so its loop is run directly)."""
    hidden, weight, labels = make_case((67,), 37, 1003, torch.float32)
    shapes = {}
    for need_grad_weight in (True, False):
        with force_triton(triton), _OutputShapes() as ops:
            _chunked_forward(hidden, weight, labels, IGNORE, 0.0, 0.0, 16, True,
                             need_grad_weight, need_grad_weight, False)
        shapes[need_grad_weight] = ops.shapes
    assert tuple(weight.shape) in shapes[True], "the check must see dW when W trains"
    assert tuple(weight.shape) not in shapes[False], "a [V, H] gradient was formed"


def test_frozen_hidden_still_trains_weight():
    hidden, weight, labels = make_case((67,), 37, 1003, torch.float32)
    ref = fwd_bwd(ours(labels, chunk_size=16), [hidden, weight])
    out = fwd_bwd(lambda h, w: ours(labels, chunk_size=16)(h.detach(), w), [hidden, weight])
    assert out[1][0] is None
    torch.testing.assert_close(out[1][1], ref[1][1])


def test_tied_embedding_weight_gets_both_gradients():
    """The lm_head tied to the embedding: the weight's gradient sums both uses."""
    hidden, weight, labels = make_case((3, 5), 37, 67, torch.float32)
    tokens = torch.randint(0, 67, (3, 5), generator=torch.Generator().manual_seed(1))

    def model(loss_fn):
        def fn(h, w):
            return loss_fn(h + F.embedding(tokens, w), w)
        return fn

    ref = fwd_bwd(model(eager(labels)), [hidden, weight])
    out = fwd_bwd(model(ours(labels, chunk_size=4)), [hidden, weight])
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("triton", [False, True])
def test_ignored_chunk_and_ignored_batch_give_zero_not_nan(triton):
    hidden, weight, labels = make_case((48,), 37, 67, torch.float32)
    labels[:16] = IGNORE  # the whole first chunk
    partial = fwd_bwd(ours(labels, chunk_size=16, triton=triton), [hidden, weight])
    expected = fwd_bwd(eager(labels), [hidden, weight])
    torch.testing.assert_close(partial, expected)
    assert torch.equal(partial[1][0][:16], torch.zeros(16, 37))

    labels.fill_(IGNORE)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with force_triton(triton):
        loss, n_tokens = linear_cross_entropy(h, w, labels, chunk_size=16, z_loss=1e-3,
                                              label_smoothing=0.1)
    loss.backward()
    assert loss.item() == 0.0 and n_tokens.item() == 0 and n_tokens.dtype == torch.int64
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_no_grad_gives_the_same_loss():
    hidden, weight, labels = make_case((67,), 37, 1003, torch.float32)
    trained, n_trained = linear_cross_entropy(hidden.requires_grad_(True), weight, labels)
    with torch.no_grad():
        evaluated, n_evaluated = linear_cross_entropy(hidden, weight, labels)
    assert not evaluated.requires_grad
    assert torch.equal(evaluated, trained.detach()) and torch.equal(n_evaluated, n_trained)


def peak_bytes(fn) -> int:
    """Peak bytes of the tensors alive while ``fn`` runs."""
    tracker = MemTracker()
    with tracker:
        fn()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


@pytest.mark.parametrize("weight_trains", [True, False])
def test_peak_memory_stays_far_below_full_logits(weight_trains):
    """1024 tokens x 4096 classes in chunks of 64: the fp32 logits alone would be 16 MiB;
    eager cross-entropy holds several copies of them. Ours is measured on the op's loop
    (dispatch modes cannot see inside a custom op); backward only scales its outputs."""
    hidden, weight, labels = make_case((1024,), 16, 4096, torch.float32)
    logits_bytes = 1024 * 4096 * 4

    def eager_step():
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(weight_trains)
        eager(labels)(h, w).backward()

    eager_peak = peak_bytes(eager_step)
    ours_peak = peak_bytes(lambda: _chunked_forward(hidden, weight, labels, IGNORE, 0.0, 0.0,
                                                    64, True, weight_trains, weight_trains, False))
    assert eager_peak > logits_bytes, "the tracker should see eager's full logits"
    assert ours_peak < logits_bytes / 2, f"peak {ours_peak} B vs full logits {logits_bytes} B"


@pytest.mark.slow
@pytest.mark.parametrize("triton", [False, True])
def test_compile_fullgraph_matches_eager(triton):
    hidden, weight, labels = make_case((2, 16), 37, 67, torch.float32)

    def mean_loss(h, w):
        loss, n_tokens = linear_cross_entropy(h, w, labels, z_loss=1e-3, label_smoothing=0.1,
                                              chunk_size=16)
        return loss / n_tokens

    with force_triton(triton):
        eager_out = fwd_bwd(mean_loss, [hidden, weight])
        compiled = fwd_bwd(torch.compile(mean_loss, fullgraph=True), [hidden, weight])
    torch.testing.assert_close(compiled, eager_out)


def test_default_chunk_size_bounds_the_logits():
    assert default_chunk_size(4096, 128256) == 512
    assert default_chunk_size(100, 32000) == 100  # small enough for one chunk
    for n_tokens, vocab in [(4096, 128256), (16384, 128256), (3000, 32000), (7, 1 << 30)]:
        chunk = default_chunk_size(n_tokens, vocab)
        assert chunk * vocab <= max(LOGITS_BUDGET, vocab), (n_tokens, vocab, chunk)
        n_chunks = -(-n_tokens // chunk)
        assert n_tokens - (n_chunks - 1) * chunk > chunk - n_chunks, "chunks are near-even"


def test_bad_input_gets_one_line_errors():
    hidden, weight, labels = make_case((3, 5), 37, 67, torch.float32)
    with pytest.raises(ValueError, match=r"weight has shape \(67, 36\).*\[vocab, 37\]"):
        linear_cross_entropy(hidden, weight[:, :36], labels)
    with pytest.raises(ValueError, match="torch.float32 but the output weight is torch.bfloat16"):
        linear_cross_entropy(hidden, weight.bfloat16(), labels)
    with pytest.raises(ValueError, match=r"labels have shape \(15,\).*\(3, 5\)"):
        linear_cross_entropy(hidden, weight, labels.reshape(-1))
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        linear_cross_entropy(hidden, weight, labels, chunk_size=0)


@pytest.mark.parametrize("weight_trains", [True, False])
def test_empty_batch(weight_trains):
    hidden, weight, labels = make_case((0,), 37, 67, torch.float32)
    h, w = hidden.requires_grad_(True), weight.requires_grad_(weight_trains)
    loss, n_tokens = linear_cross_entropy(h, w, labels)
    loss.backward()
    assert loss.item() == 0.0 and n_tokens.item() == 0
    assert h.grad.shape == (0, 37)
    if weight_trains:
        assert torch.equal(w.grad, torch.zeros_like(w))


def _grad_weight_traffic(device, dtype, monkeypatch):
    """(bytes moved per dW element per chunk, dW GEMMs, chunks) of the trained output
    weight's accumulation, counted op by op. Everything that touches a [rows, H] tensor
    other than W itself, h and dh (rows in 16 < rows) is dW traffic."""
    import sys

    lce = sys.modules["fastune.kernels.linear_cross_entropy"]
    from fastune.bench.counting import OpCounter

    monkeypatch.setattr(lce, "GRAD_WEIGHT_SLICE", 128)  # several slices where they exist
    n_tokens, hidden_size, vocab, chunk = 64, 24, 300, 16
    hidden, weight, labels = make_case((n_tokens,), hidden_size, vocab, torch.float32)
    hidden, weight, labels = hidden.to(device, dtype), weight.to(device, dtype), labels.to(device)
    weight_storage = weight.untyped_storage()._cdata

    def is_grad_weight(t):
        return (t.dim() == 2 and t.shape[1] == hidden_size and t.shape[0] > chunk
                and t.shape[0] != n_tokens and t.untyped_storage()._cdata != weight_storage)

    with OpCounter() as ops:
        _, _, grad_weight = _chunked_forward(hidden, weight, labels, IGNORE, 0.0, 0.0, chunk,
                                             True, True, True, False)
    moved = gemms = 0
    for r in ops.records:
        touched = [t for t in r.reads + r.writes if is_grad_weight(t)]
        moved += sum(t.numel() * t.element_size() for t in touched)
        gemms += bool(touched) and r.name in ("mm", "addmm")
    n_chunks = n_tokens // chunk
    return moved / (vocab * hidden_size) / n_chunks, gemms, n_chunks, grad_weight


@pytest.mark.parametrize("device,dtype", [("meta", torch.bfloat16), ("cpu", torch.float32)])
def test_trained_weight_gradient_moves_8_bytes_per_element_per_chunk(device, dtype,
                                                                     monkeypatch):
    """dW is accumulated by one GEMM per chunk straight into the fp32 buffer: the buffer
    is read and written once (8 bytes per element), where a bf16 GEMM result, its fp32
    copy and the add moved 20. On meta tensors, bf16 takes the path CUDA takes (CPU has no
    16-bit GEMM with fp32 output; it keeps slice buffers, checked for values elsewhere)."""
    per_element, gemms, n_chunks, grad_weight = _grad_weight_traffic(device, dtype, monkeypatch)
    print(f"\ndW traffic {device} {dtype}: {per_element:.1f} bytes per element per chunk, "
          f"{gemms} GEMMs for {n_chunks} chunks")
    assert grad_weight.dtype == torch.float32
    assert per_element <= 8
    assert gemms == n_chunks


def test_supervised_count_from_the_caller_gives_the_same_result_without_a_sync():
    from fastune.bench.counting import HostSyncs

    hidden, weight, labels = make_case((67,), 37, 1003, torch.float32)
    n = int((labels != IGNORE).sum())
    out = {}
    for given in (None, n):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        with HostSyncs() as syncs:
            loss, _ = linear_cross_entropy(h, w, labels, chunk_size=16, num_supervised=given)
            loss.backward()
        out[given] = (loss, h.grad, w.grad, len(syncs.calls))
    assert out[None][3] == 1 and out[n][3] == 0  # the count, read back to the host
    torch.testing.assert_close(out[n][:3], out[None][:3], rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_supervised must be between 0 and the 67"):
        linear_cross_entropy(hidden, weight, labels, num_supervised=68)
