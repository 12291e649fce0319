import pytest, torch

def pytest_collection_modifyitems(config, items):
    "`cuda` tests need a GPU: skip them with a reason when none is visible, even if selected with -m cuda."
    if torch.cuda.is_available(): return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if 'cuda' in item.keywords: item.add_marker(skip)
