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


def tiny_llama(vocab:int=64, hidden:int=32, layers:int=2, heads:int=4, kv_heads:int=2, head_dim:int|None=None,
               dtype=torch.float32, seed:int=0, **kw):
    "A small randomly initialised transformers Llama (GQA when kv_heads < heads): real HF code paths, test-sized."
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2*hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim or hidden//heads,
                      max_position_embeddings=128, **kw)
    return LlamaForCausalLM(cfg).to(dtype).eval()
