"""Tests of tensormem.ops.triton_utils: interpreter selection, helpers, and (slow) that every kernel of both ops modules
compiles for sm_90 and sm_80 without a GPU."""
import os
import torch
if not torch.cuda.is_available(): os.environ.setdefault('TRITON_INTERPRET', '1')   # before anything imports triton
import pytest
from tensormem.ops.triton_utils import INTERPRET, HAS_CUDA, HAS_TRITON, _p2, _alloc, _backend, compile_report


@pytest.mark.skipif(not HAS_TRITON, reason='needs the gpu extra: pip install "tensormem[gpu]"')
def test_interpreter_on_cpu():
    assert HAS_CUDA or INTERPRET, "without a GPU the kernels must be built for Triton's interpreter"


def test_helpers():
    assert [_p2(x) for x in (0, 1, 3, 16, 17)] == [1, 1, 4, 16, 32] and _p2(5, lo=16) == 16
    assert _alloc((4,), torch.float32, 'cpu', poison=True).isnan().all()
    assert _backend('auto', torch.zeros(1)) == ('triton' if HAS_CUDA else 'torch')
    with pytest.raises(ValueError, match="`backend` must be 'auto', 'triton' or 'torch'"): _backend('gpu', torch.zeros(1))


@pytest.mark.slow
def test_kernels_compile_for_h100_and_a100():
    "Every kernel compiles to a cubin for sm_90 and sm_80 without a GPU (Triton's compiler + bundled ptxas), no spills."
    for arch in (90, 80):
        rows = compile_report('tensormem.ops.dla', arch) + compile_report('tensormem.ops.hqmq', arch)
        assert len(rows) == 8 and all(r['compiled'] for r in rows), [r.get('error') for r in rows]
        assert all(r['stack_bytes'] == 0 for r in rows)
