"""precondition against the float64 reference and against the dense Kronecker inverse."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ngcuda import ops, reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def rel_err(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def eig_of_random_psd(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.randn(n, n + 2, generator=gen, dtype=torch.float64)
    return torch.linalg.eigh(m @ m.T / (n + 2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(
    shapes=st.lists(st.tuples(st.integers(1, 300), st.integers(1, 300)), min_size=1, max_size=4),
    damping=st.sampled_from([1e-3, 1e-1, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_precondition_matches_reference(device, dtype, shapes, damping, seed):
    gen = torch.Generator().manual_seed(seed)
    grads, QA, lamA, QG, lamG = [], [], [], [], []
    for dout, din in shapes:
        la, qa = eig_of_random_psd(din, gen)
        lg, qg = eig_of_random_psd(dout, gen)
        grads.append(torch.randn(dout, din, generator=gen, dtype=torch.float64))
        QA.append(qa), lamA.append(la), QG.append(qg), lamG.append(lg)
    expected = reference.precondition(grads, QA, lamA, QG, lamG, damping)
    cast = lambda ts: [t.to(device=device, dtype=dtype) for t in ts]  # noqa: E731
    out = ops.precondition(cast(grads), cast(QA), cast(lamA), cast(QG), cast(lamG), damping)
    assert len(out) == len(grads)
    for o, e in zip(out, expected):
        assert o.shape == e.shape and o.dtype == dtype
        assert rel_err(o, e) <= TOL[dtype] * 10  # float32 rounding grows with the condition number


# (2, 17) and (1, 8) take the kernel's transposed path for skinny layers (8·d_out ≤ d_in);
# (2, 15) and (1, 7) sit just below that threshold.
@pytest.mark.parametrize("dout, din", [(3, 4), (2, 17), (2, 15), (1, 8), (1, 7), (17, 2), (1, 1)])
def test_precondition_is_the_damped_kronecker_inverse(dout, din):
    """(A⊗G + γI)⁻¹ vec(g) built densely, with vec stacking columns of g [d_out, d_in]."""
    gen = torch.Generator().manual_seed(1)
    gamma = 0.05
    la, qa = eig_of_random_psd(din, gen)
    lg, qg = eig_of_random_psd(dout, gen)
    A, G = qa @ torch.diag(la) @ qa.T, qg @ torch.diag(lg) @ qg.T
    g = torch.randn(dout, din, generator=gen, dtype=torch.float64)
    F = torch.kron(A, G) + gamma * torch.eye(dout * din, dtype=torch.float64)
    dense = torch.linalg.solve(F, g.T.reshape(-1)).reshape(din, dout).T
    (out,) = ops.precondition([g], [qa], [la], [qg], [lg], gamma)
    assert rel_err(out, dense) <= 1e-12


# Wide layers (8·d_out ≤ d_in, d_in ≥ 512, d_out ≤ 64) go through column blocks of Q_A, 128 wide,
# summed over threads, in panels of 16 outputs: a last partial block (517 = 4·128 + 5), one block
# exactly (512), an input count no multiple of 16 (1000), panels of 1, 16, 17 and 64 outputs, a
# layer list mixing the wide and plain paths (65 outputs, 511 inputs), and Q_A as torch.linalg.eigh
# returns it (column-major), at 1 and 2 threads.
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("column_major", [False, True])
def test_precondition_wide_layers(threads, dtype, tol, column_major):
    gen = torch.Generator().manual_seed(3)
    shapes = [(3, 517), (1, 512), (16, 1434), (17, 1000), (64, 512), (65, 600), (64, 511), (5, 7)]
    args = {k: [] for k in ("grads", "QA", "lamA", "QG", "lamG")}
    for dout, din in shapes:
        la, qa = eig_of_random_psd(din, gen)
        lg, qg = eig_of_random_psd(dout, gen)
        for k, v in zip(args, (torch.randn(dout, din, generator=gen, dtype=torch.float64),
                               qa, la, qg, lg)):
            args[k].append(v)
    expected = reference.precondition(**args, damping=0.03)
    cast = {k: [t.to(dtype) for t in v] for k, v in args.items()}
    cast["QA"] = [q.T.contiguous().T if column_major else q.contiguous() for q in cast["QA"]]
    assert cast["QA"][0].is_contiguous() != column_major
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = ops.precondition(**cast, damping=0.03)
    finally:
        torch.set_num_threads(before)
    for o, e in zip(out, expected):
        assert o.dtype == dtype and rel_err(o, e) <= tol


def test_precondition_empty_list():
    assert ops.precondition([], [], [], [], [], 0.1) == []


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a["QA"].pop(), "one QA, lamA, QG and lamG per gradient"),
        (lambda a: a["QA"].__setitem__(0, torch.eye(3)), r"QA\[0\] must be \[4, 4\]"),
        (lambda a: a["QG"].__setitem__(0, torch.eye(4)), r"QG\[0\] must be \[2, 2\]"),
        (lambda a: a["lamA"].__setitem__(0, torch.ones(3)), r"lamA\[0\] must be \[4\]"),
        (lambda a: a["lamG"].__setitem__(0, torch.ones(3)), r"lamG\[0\] must be \[2\]"),
        (lambda a: a["grads"].__setitem__(0, torch.ones(2, 4, 1)), r"grads\[0\] must be 2-D"),
        (lambda a: a["QA"].__setitem__(0, torch.eye(4, dtype=torch.float64)), "mixes dtypes"),
        (lambda a: a.__setitem__("damping", -1.0), "damping must be non-negative"),
    ],
)
def test_precondition_bad_input(mutate, match):
    args = dict(grads=[torch.randn(2, 4)], QA=[torch.eye(4)], lamA=[torch.ones(4)],
                QG=[torch.eye(2)], lamG=[torch.ones(2)], damping=0.1)
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        ops.precondition(**args)


def test_precondition_refuses_layers_on_two_devices():
    # The check is shared by every backend; a meta layer next to a CPU one reaches it without a GPU
    # (tests/test_cuda_ops.py has the CPU-next-to-CUDA case, where the kernel would read host pointers).
    layer = [torch.randn(2, 4), torch.eye(4), torch.ones(4), torch.eye(2), torch.ones(2)]
    other = [t.to("meta") for t in layer]
    with pytest.raises(RuntimeError, match=r"grads\[1\] is on meta but grads\[0\] is on cpu"):
        torch.ops.ngcuda.precondition(*[[a, b] for a, b in zip(layer, other)], 0.1)
    out = torch.ops.ngcuda.precondition(*[[a, a] for a in layer], 0.1)  # one device: fine
    torch.testing.assert_close(out[0], out[1])
