"""The CPU vector kernels a machine would not pick by itself (NGCUDA_CPU_ISA caps the level):
the generic and AVX2 variants of small_gemm (warm eigensolver), panel_gemm (wide-layer
precondition) and the Householder + QL cold eigensolver, each against the float64 reference in a
fresh process."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import ngcuda

CHECK = textwrap.dedent("""
    import sys
    import torch
    import ngcuda
    from ngcuda import ops, reference

    want = sys.argv[1]
    got = ngcuda.build_info()["cpu_kernels"]
    order = ["generic", "avx2", "avx512"]
    assert order.index(got) <= order.index(want), (want, got)
    gen = torch.Generator().manual_seed(0)

    def psd(n):
        m = torch.randn(n, n + 2, generator=gen, dtype=torch.float64)
        return torch.linalg.eigh(m @ m.T / (n + 2))

    # precondition: wide layers (panel kernels, remainder rows, two panels) and a plain one
    shapes = [(16, 1434), (3, 517), (17, 1000), (5, 7)]
    args = {k: [] for k in ("grads", "QA", "lamA", "QG", "lamG")}
    for dout, din in shapes:
        la, qa = psd(din)
        lg, qg = psd(dout)
        for k, v in zip(args, (torch.randn(dout, din, generator=gen, dtype=torch.float64),
                               qa, la, qg, lg)):
            args[k].append(v)
    expected = reference.precondition(**args, damping=0.03)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        out = ops.precondition(**{k: [t.to(dtype) for t in v] for k, v in args.items()},
                               damping=0.03)
        for o, e in zip(out, expected):
            err = float((o.double() - e).norm() / e.norm())
            assert err <= tol, (dtype, tuple(e.shape), err)

    # warm batched_eigh (small_gemm): drifted factors of sizes the refinement takes
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        mats, prevs = [], []
        for n in (29, 33, 64):
            q = psd(n)[1]
            a = q @ torch.diag(torch.logspace(0, -3, n, dtype=torch.float64)) @ q.T
            prevs.append(torch.linalg.eigh(a)[1].to(dtype).contiguous())
            drift = torch.randn(n, n, generator=gen, dtype=torch.float64)
            mats.append((a + 1e-3 * a.norm() * (drift @ drift.T) / (drift @ drift.T).norm()).to(dtype))
        vals, vecs = ops.batched_eigh(mats, prevs)
        for a, lam, q in zip(mats, vals, vecs):
            a, lam, q = a.double(), lam.double(), q.double()
            res = float((a @ q - q * lam).norm() / a.norm())
            orth = float((q.T @ q - torch.eye(q.shape[0], dtype=torch.float64)).norm())
            assert res <= tol and orth <= tol, (dtype, a.shape[0], res, orth)

    # cold batched_eigh (Householder + QL): float64 work, so float32 results hold to ~1e-7·√n
    for dtype, sizes in ((torch.float32, (11, 33, 64, 96)), (torch.float64, (11, 64, 150))):
        mats = []
        for n in sizes:
            q = psd(n)[1]
            a = q @ torch.diag(torch.logspace(0, -3, n, dtype=torch.float64)) @ q.T
            mats.append(((a + a.T) / 2).to(dtype))
        vals, vecs = ops.batched_eigh(mats)
        for a, lam, q in zip(mats, vals, vecs):
            a, lam, q = a.double(), lam.double(), q.double()
            n = a.shape[0]
            bound = 1e-7 * n**0.5 if dtype == torch.float32 else 1e-12
            res = float((a @ q - q * lam).norm() / a.norm())
            orth = float((q.T @ q - torch.eye(n, dtype=torch.float64)).norm())
            assert res <= bound and orth <= bound, (dtype, n, res, orth)
    print("ok", got)
""")


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_capped_cpu_kernels_match_the_reference(isa):
    env = dict(os.environ, NGCUDA_CPU_ISA=isa, OMP_NUM_THREADS="2")
    root = os.path.dirname(os.path.dirname(os.path.abspath(ngcuda.__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", CHECK, isa], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ok")


def test_bad_cpu_isa_is_refused():
    env = dict(os.environ, NGCUDA_CPU_ISA="avx3")
    root = os.path.dirname(os.path.dirname(os.path.abspath(ngcuda.__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", "import ngcuda; ngcuda.build_info()"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "NGCUDA_CPU_ISA must be generic, avx2 or avx512, got 'avx3'" in done.stderr
