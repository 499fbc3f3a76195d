"""The build itself: backends, schema registration, fake kernels and torch.compile."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ngcuda
from ngcuda import ops

OPS = ["factor_update_", "sparse_factor_update_", "block_factor_update_",
       "sparse_block_factor_update_", "batched_eigh", "precondition"]
FACTOR_OPS = OPS[:4]


@pytest.mark.skipif(torch.version.cuda is None or shutil.which("nvcc") is None,
                    reason="needs a CUDA build of torch and nvcc, as the CUDA kernels' build does")
def test_setup_refuses_architectures_nvcc_cannot_build():
    # setup.py evaluates its extension for any command; --name compiles nothing
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "NGCUDA_CUDA": "1"}
    release = re.search(r"release (\d+)", subprocess.run(["nvcc", "--version"], capture_output=True,
                                                          text=True).stdout)
    if release is None or int(release.group(1)) < 13:
        pytest.skip("nvcc before 13 builds sm_70")
    bad = subprocess.run([sys.executable, "setup.py", "--name"], cwd=root, capture_output=True,
                         text=True, timeout=300, env={**env, "TORCH_CUDA_ARCH_LIST": "7.0;9.0"})
    assert bad.returncode != 0
    assert "not 7.0" in bad.stderr and "NGCUDA_CUDA=0" in bad.stderr
    good = subprocess.run([sys.executable, "setup.py", "--name"], cwd=root, capture_output=True,
                          text=True, timeout=300, env={**env, "TORCH_CUDA_ARCH_LIST": "8.0;9.0a"})
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip().endswith("ngcuda")


def test_build_info_reports_cpu_and_versions():
    info = ngcuda.build_info()
    assert "cpu" in info["backends"]
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]


@pytest.mark.skipif(os.environ.get("NGCUDA_EXPECT_CUDA") != "1",
                    reason="only when the build was asked to compile the CUDA kernels")
def test_build_info_reports_cuda_when_requested():
    info = ngcuda.build_info()
    assert "cuda" in info["backends"], info
    assert "9.0" in info["cuda_archs"]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("key", ["CPU", "Meta"])
def test_every_op_has_cpu_and_meta_kernels(op, key):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ngcuda::{op}", key)


@pytest.mark.parametrize("op", FACTOR_OPS)
@pytest.mark.parametrize("key", ["SparseCsrCPU", "SparseCsrMeta"])
def test_factor_ops_take_sparse_csr_x(op, key):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ngcuda::{op}", key)


@pytest.mark.skipif("cuda" not in ngcuda.build_info()["backends"], reason="CPU-only build")
@pytest.mark.parametrize("op", OPS)
def test_every_op_has_cuda_kernel_when_built(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ngcuda::{op}", "CUDA")
    if op in FACTOR_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ngcuda::{op}", "SparseCsrCUDA")


def test_meta_kernels_give_shapes_without_data():
    m = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    torch.ops.ngcuda.factor_update_(m(4, 4), m(10, 3), 0.5, True, None)
    vals, vecs, status = torch.ops.ngcuda.batched_eigh([m(3, 3), m(5, 5)], None, None, 15)
    assert [v.shape for v in vals] == [(3,), (5,)] and [v.shape for v in vecs] == [(3, 3), (5, 5)]
    assert status.shape == (2,) and status.dtype == torch.int32
    (out,) = torch.ops.ngcuda.precondition([m(2, 4)], [m(4, 4)], [m(4)], [m(2, 2)], [m(2)], 0.1)
    assert out.shape == (2, 4)
    with pytest.raises(RuntimeError, match=r"factor must be \[6, 6\]"):
        torch.ops.ngcuda.factor_update_(m(4, 4), m(10, 5), 0.5, True, None)


@pytest.mark.parametrize("call, match", [
    (lambda m: torch.ops.ngcuda.batched_eigh([m(3, 3, dtype=torch.float16)], None, None, 15),
     r"matrices\[0\] must be float32 or float64"),
    (lambda m: torch.ops.ngcuda.batched_eigh([m(3, 3)], None, None, -1), "max_sweeps must be >= 0"),
    (lambda m: torch.ops.ngcuda.factor_update_(m(4, 4), m(10, 3, dtype=torch.int64), 0.5, True, None),
     "x must be float32 or float64"),
])
def test_meta_kernels_refuse_what_the_cpu_kernels_refuse(call, match):
    m = lambda *s, dtype=torch.float32: torch.empty(*s, device="meta", dtype=dtype)  # noqa: E731
    with pytest.raises(RuntimeError, match=match):
        call(m)
    with pytest.raises(RuntimeError, match=match):
        call(lambda *s, dtype=torch.float32: torch.zeros(*s, dtype=dtype))


def test_fake_outputs_have_the_kernels_strides():
    """A transposed input: the kernels return contiguous tensors, and so must the fake ones
    (torch.compile checks them against each other)."""
    from torch.library import opcheck

    torch.manual_seed(0)
    b = torch.randn(5, 5, dtype=torch.float64)
    a = (b + b.T).T  # symmetric, column-major strides
    opcheck(torch.ops.ngcuda.batched_eigh.default, ([a], None, None, 15),
            test_utils=("test_faketensor",))
    g = torch.randn(4, 2).T  # [2, 4], strides (1, 2)
    opcheck(torch.ops.ngcuda.precondition.default,
            ([g], [torch.eye(4)], [torch.ones(4)], [torch.eye(2)], [torch.ones(2)], 0.1),
            test_utils=("test_faketensor",))


def test_torch_compile_fullgraph_traces_factor_update_and_precondition():
    def step(factor, x, g, qa, la, qg, lg):
        ops.factor_update_(factor, x, 0.9, True)
        return ops.precondition([g], [qa], [la], [qg], [lg], 0.1)[0] * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    x, g = torch.randn(8, 3), torch.randn(2, 4)
    la, qa = torch.linalg.eigh(torch.eye(4) + 0.1)
    lg, qg = torch.linalg.eigh(torch.eye(2) * 2)
    f_eager, f_comp = torch.eye(4), torch.eye(4)
    expected = step(f_eager, x, g, qa, la, qg, lg)
    got = compiled(f_comp, x, g, qa, la, qg, lg)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(f_comp, f_eager, atol=1e-6), "the in-place update must survive compilation"


def test_opcheck_schemas():
    from torch.library import opcheck

    x = torch.randn(6, 3)
    opcheck(torch.ops.ngcuda.factor_update_.default, (torch.eye(4), x, 0.5, True, None))
    rowptr, col = torch.tensor([0, 2, 3, 3]), torch.tensor([0, 2, 1])
    opcheck(torch.ops.ngcuda.sparse_factor_update_.default,
            (torch.eye(4), rowptr, col, None, torch.randn(3, 3), 0.5, True, None))
    opcheck(torch.ops.ngcuda.precondition.default,
            ([torch.randn(2, 4)], [torch.eye(4)], [torch.ones(4)], [torch.eye(2)], [torch.ones(2)], 0.1))
