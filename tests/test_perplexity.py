import math, pytest, torch
pytest.importorskip('transformers', reason='needs the hf extra: pip install "tensormem[hf]"')
from hypothesis import given, settings, strategies as st
from conftest import tiny_llama
from tensormem.perplexity import jargon_text, token_stream, windows, window_nll, perplexity
from tensormem.hf_cache import QuantizedKVCache, CastQuantizer

def test_jargon_text_real_and_missing(tmp_path):
    t = jargon_text()
    assert t.startswith('Welcome to the Jargon File') and len(t) > 1_000_000
    with pytest.raises(FileNotFoundError, match='apt-get install jargon-text'): jargon_text(tmp_path/'nope.gz')

@settings(max_examples=20, deadline=None)
@given(n_tok=st.integers(2, 200), length=st.integers(2, 50))
def test_windows_nonoverlapping(n_tok, length):
    s = torch.arange(n_tok)
    if n_tok < length:
        with pytest.raises(ValueError, match='the stream holds 0'): windows(s, length)
        return
    w = windows(s, length)
    assert w.shape == (n_tok // length, length)
    assert torch.equal(w.flatten(), s[:w.numel()])          # contiguous, stride = length, no overlap
    with pytest.raises(ValueError, match='requested'): windows(s, length, n_tok // length + 1)

def test_windows_bad_input():
    with pytest.raises(TypeError, match='torch.long'): windows(torch.zeros(10), 5)
    with pytest.raises(ValueError, match='dims'): windows(torch.zeros(2, 5, dtype=torch.long), 5)
    with pytest.raises(ValueError, match='length'): windows(torch.arange(10), 1)

def test_token_stream_no_special_tokens():
    from tensormem.hf_cache import load_smollm2
    _, tok = load_smollm2(device='cpu')
    s = token_stream(tok, "The hacker ethic is a philosophy.")
    assert s.dtype == torch.long and s.ndim == 1
    assert tok.bos_token_id not in s.tolist()
    assert tok.decode(s) == "The hacker ethic is a philosophy."
    with pytest.raises(ValueError): token_stream(tok, "")

@pytest.fixture(scope='module')
def tiny(): return tiny_llama(vocab=61)

def test_perplexity_matches_manual_nll(tiny):
    wins = torch.randint(0, 61, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(): lp = tiny(wins).logits[:, :-1].log_softmax(-1)
    manual = -lp.gather(-1, wins[:, 1:, None]).sum().item()
    r = perplexity(tiny, wins, progress=False)
    assert r.tokens == 3 * 19 and math.isclose(r.nll, manual, rel_tol=1e-5)
    assert math.isclose(r.ppl, math.exp(manual / 57), rel_tol=1e-5)
    assert math.isnan(r.bits)                                  # the dense default reports no bytes

def test_perplexity_fresh_cache_per_window_and_bytes(tiny):
    wins = torch.randint(0, 61, (4, 16), generator=torch.Generator().manual_seed(1))
    made = []
    def mk(cfg): made.append(QuantizedKVCache(cfg, CastQuantizer(None))); return made[-1]
    r = perplexity(tiny, wins, mk, progress=False)
    assert len(made) == 4 and len({id(c) for c in made}) == 4 and all(c.get_seq_length() == 16 for c in made)
    assert math.isclose(r.nll, perplexity(tiny, wins, progress=False).nll, rel_tol=1e-6)   # lossless store = dense
    assert r.bits == 32.0 and r.cache_bytes == 2 * 2 * 2 * 16 * 8 * 4
    r16 = perplexity(tiny, wins, lambda c: QuantizedKVCache(c, CastQuantizer(torch.float16)), batch_size=2, progress=False)
    assert r16.bits == 16.0 and r16.cache_bytes == r.cache_bytes / 2
    assert r16.nll != r.nll and math.isclose(r16.nll, r.nll, rel_tol=1e-3)

def test_window_nll_bad_ids(tiny):
    with pytest.raises(ValueError, match='`ids`'): window_nll(tiny, torch.zeros(5, dtype=torch.long))

def test_perplexity_bad_windows_clear_errors(tiny):
    wins = torch.randint(0, 61, (3, 8), generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match='≥ 2 tokens'): perplexity(tiny, wins[:, :1], progress=False)   # was ZeroDivisionError
    with pytest.raises(ValueError, match='≥ 1 window'): perplexity(tiny, wins[:0], progress=False)
    with pytest.raises(TypeError, match='integer token ids'): perplexity(tiny, wins.float(), progress=False)
    with pytest.raises(TypeError, match='integer token ids'): perplexity(tiny, wins.bool(), progress=False)
    with pytest.raises(ValueError, match='`wins` must have 2 dims'): perplexity(tiny, wins[None], progress=False)
    with pytest.raises(ValueError, match=r"\[0, 61\).*got ids in \[61, 61\]"): perplexity(tiny, torch.full((1, 4), 61), progress=False)
    with pytest.raises(ValueError, match='vocabulary'): perplexity(tiny, wins - 1 - wins.max(), progress=False)
    with pytest.raises(ValueError, match='`batch_size`'): perplexity(tiny, wins, batch_size=0, progress=False)
    with pytest.raises(TypeError, match='`make_cache`'): perplexity(tiny, wins, make_cache=16, progress=False)
    assert perplexity(tiny, wins.int(), progress=False).tokens == 3 * 7          # int32 ids are ids too

def test_window_nll_bad_ids_named(tiny):
    with pytest.raises(ValueError, match='`ids`.*≥ 2 tokens'): window_nll(tiny, torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(TypeError, match='`ids` must hold integer'): window_nll(tiny, torch.zeros(2, 5))
    with pytest.raises(ValueError, match='`ids`.*vocabulary'): window_nll(tiny, torch.full((1, 5), 100))

def test_windows_bad_length_and_n():
    s = torch.arange(20)
    with pytest.raises(ValueError, match='`length`'): windows(s, 2.5)
    with pytest.raises(ValueError, match='`n`'): windows(s, 5, 0)
    with pytest.raises(ValueError, match='`n`'): windows(s, 5, 1.0)

def test_cache_bytes_per_window_with_partial_last_batch(tiny):
    "3 windows in batches of 2 hold what 3 windows in batches of 1 hold: bytes per window are total / windows."
    wins = torch.randint(0, 61, (3, 8), generator=torch.Generator().manual_seed(3))
    mk = lambda c: QuantizedKVCache(c, CastQuantizer(torch.float16))
    a, b = perplexity(tiny, wins, mk, batch_size=2, progress=False), perplexity(tiny, wins, mk, progress=False)
    assert a.cache_bytes == b.cache_bytes == 2 * 2 * 2 * 8 * 8 * 2
