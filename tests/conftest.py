import pytest, torch

# One intra-op thread for the whole test session: the models under test are tiny, and on a 2-core machine that
# also runs other work, OpenMP/MKL threads that wait on busy cores make small matmuls stall for milliseconds.
torch.set_num_threads(1)

def pytest_collection_modifyitems(config, items):
    "`cuda` tests need a GPU: skip them with a reason when none is visible, even if selected with -m cuda."
    if torch.cuda.is_available(): return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if 'cuda' in item.keywords: item.add_marker(skip)
