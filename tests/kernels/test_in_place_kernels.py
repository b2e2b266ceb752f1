"""Kernels that write over what they read: no race between a program's threads, no second
buffer in backward.

The static check reads each Triton kernel's source. In a kernel that stores into a buffer
it also loads from, a load at the same offsets as the store (each thread reads the
element it then writes) is safe. Any other load of that buffer (a scalar, a gathered
element) must come before a reduction that precedes the first store: a reduction is a
barrier between the program's warps, and without one a warp may overwrite the element
before another warp has read it. The interpreter runs each program as one thread and
cannot show such a race."""

import ast
import importlib
import inspect
import textwrap

import pytest
import torch
from triton.runtime.jit import JITFunction

from fastune.bench.counting import OpCounter
from fastune.kernels import aot
from fastune.kernels.cross_entropy import cross_entropy
from fastune.kernels.dispatch import force_triton

# Calls that synchronize a program's threads (reductions go through shared memory).
BARRIERS = {"max", "min", "sum", "reduce", "argmax", "argmin", "xor_sum", "debug_barrier",
            "cumsum", "associative_scan"}


def _call_name(node):
    return node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")


def _base(expr):
    """The leftmost name of a pointer expression: ``row_ptr`` in ``row_ptr + cols``."""
    while isinstance(expr, ast.BinOp):
        expr = expr.left
    return expr.id if isinstance(expr, ast.Name) else None


def _events(tree):
    """(kind, base, offsets) in source order: kind is load, store or barrier."""
    events = []
    for node in sorted((n for n in ast.walk(tree) if isinstance(n, ast.Call)),
                       key=lambda n: (n.lineno, n.col_offset)):
        name = _call_name(node)
        if name in ("load", "store") and node.args:
            events.append((name, _base(node.args[0]), ast.dump(node.args[0])))
        elif name in BARRIERS:
            events.append(("barrier", None, None))
    return events


def race_hazards(source: str) -> list[str]:
    """The loads of an in-place buffer that no barrier separates from its first store."""
    events = _events(ast.parse(textwrap.dedent(source)))
    stored = {}
    for kind, base, offsets in events:
        if kind == "store":
            stored.setdefault(base, set()).add(offsets)
    hazards = []
    for i, (kind, base, offsets) in enumerate(events):
        if kind != "load" or base not in stored or offsets in stored[base]:
            continue
        for later_kind, later_base, _ in events[i + 1:]:
            if later_kind == "barrier":
                break
            if later_kind == "store" and later_base == base:
                hazards.append(f"load of {base} at {offsets} races with a later store")
                break
    return hazards


def _kernels():
    for mod_name in aot.spec_modules():
        module = importlib.import_module(mod_name)
        for attr, value in vars(module).items():
            fn = getattr(value, "fn", None)
            if isinstance(value, JITFunction) or (attr.endswith("_kernel") and fn is not None):
                yield f"{mod_name}.{attr}", inspect.getsource(fn or value)


OLD_CROSS_ENTROPY = '''
def kernel(logits_ptr, labels_ptr, loss_ptr, vocab, BLOCK_V: tl.constexpr):
    row_ptr = logits_ptr + tl.program_id(0) * vocab
    label = tl.load(labels_ptr + tl.program_id(0))
    m = float("-inf")
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        m = tl.maximum(m, tl.max(tl.load(row_ptr + cols), axis=0))
    target = tl.load(row_ptr + label)
    tl.store(loss_ptr, m - target)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols)
        tl.store(row_ptr + cols, tl.exp(x - m))
'''


def test_the_check_finds_the_target_read_after_the_last_reduction():
    """The cross-entropy kernel as it was: the target logit read after pass 1's reductions,
    pass 2 overwriting the row with no barrier in between."""
    assert race_hazards(OLD_CROSS_ENTROPY) == [
        "load of row_ptr at BinOp(left=Name(id='row_ptr', ctx=Load()), op=Add(), "
        "right=Name(id='label', ctx=Load())) races with a later store"]
    fixed = OLD_CROSS_ENTROPY.replace("    target = tl.load(row_ptr + label)\n", "")
    fixed = fixed.replace("    m = float", "    target = tl.load(row_ptr + label)\n    m = float")
    assert race_hazards(fixed) == []


def test_no_in_place_kernel_reads_after_its_last_barrier():
    kernels = dict(_kernels())
    assert "fastune.kernels.cross_entropy._cross_entropy_kernel" in kernels
    bad = {name: race_hazards(src) for name, src in kernels.items() if race_hazards(src)}
    assert not bad, bad


@pytest.mark.parametrize("triton", [False, True])
def test_backward_scales_the_saved_buffer_in_place(triton):
    """The gradient handed back is the forward's buffer (the logits' own storage), and no
    op of backward writes another [rows, V] tensor."""
    gen = torch.Generator().manual_seed(0)
    x = (4 * torch.randn(9, 67, generator=gen)).requires_grad_(True)
    labels = torch.randint(0, 67, (9,), generator=gen)
    labels[::3] = -100
    truth = x.detach().double().requires_grad_(True)
    with force_triton(triton):
        logits = x * 1.0
        loss, _ = cross_entropy(logits, labels)
        with OpCounter() as ops:
            (grad,) = torch.autograd.grad(2.0 * loss, [logits])
    buffer = logits.untyped_storage().data_ptr()
    assert grad.untyped_storage().data_ptr() == buffer
    big = [t for r in ops.records for t in r.writes if t.shape == (9, 67)]
    assert big and all(t.untyped_storage().data_ptr() == buffer for t in big), "a second buffer"
    torch.nn.functional.cross_entropy(truth, labels, reduction="sum").backward()
    torch.testing.assert_close(grad, (2.0 * truth.grad).float())


def test_ignored_rows_are_never_read():
    """An ignored row of the kernel's buffer may hold anything, NaN included: it is not
    read, its loss is 0 and its gradient row is written as zeros."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 67, generator=gen, dtype=torch.float64).float()
    labels = torch.tensor([3, -100, 60, -100, 0])
    x[1], x[3] = float("nan"), float("inf")
    leaf = x.clone().requires_grad_(True)
    with force_triton(True):
        loss, _ = cross_entropy(leaf * 1.0, labels)
    loss.backward()
    kept = labels != -100
    truth = x[kept].double().requires_grad_(True)
    expected = torch.nn.functional.cross_entropy(truth, labels[kept], reduction="sum")
    expected.backward()
    torch.testing.assert_close(loss.double(), expected)
    assert torch.equal(leaf.grad[~kept], torch.zeros(2, 67))
    torch.testing.assert_close(leaf.grad[kept].double(), truth.grad)
