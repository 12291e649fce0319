import os
import pytest, torch
from hypothesis import settings

# CI reruns must be reproducible: under CI, hypothesis draws the same examples every run (locally it explores anew)
settings.register_profile('ci', derandomize=True, deadline=None)
if os.environ.get('CI'): settings.load_profile('ci')

# One intra-op thread for the whole test session: the models under test are tiny, and on a 2-core machine that
# also runs other work, OpenMP/MKL threads that wait on busy cores make small matmuls stall for milliseconds.
torch.set_num_threads(1)

def pytest_collection_modifyitems(config, items):
    "`cuda` tests need a GPU: skip them with a reason when none is visible, even if selected with -m cuda."
    if torch.cuda.is_available(): return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if 'cuda' in item.keywords: item.add_marker(skip)


def tiny_llama(*args, **kw):
    "The package's one test-sized Llama (`tensormem.hf_cache.tiny_llama`); skips the test when the `hf` extra is missing."
    pytest.importorskip('transformers', reason='needs the hf extra: pip install "tensormem[hf]"')
    from tensormem.hf_cache import tiny_llama as make
    return make(*args, **kw)
