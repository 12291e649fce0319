"Import every exported module of the installed package and check the public names each promises."
import importlib, pkgutil
import pytest
import tensormem

MODULES = sorted(m.name for m in pkgutil.iter_modules(tensormem.__path__) if not m.name.startswith('_'))

def test_version():
    import configparser, pathlib
    cfg = configparser.ConfigParser(); cfg.read(pathlib.Path(__file__).parents[1]/'settings.ini')
    assert tensormem.__version__ == cfg['DEFAULT']['version']

@pytest.mark.parametrize('name', MODULES)
def test_import_and_all(name):
    mod = importlib.import_module(f'tensormem.{name}')
    for attr in getattr(mod, '__all__', []):
        assert hasattr(mod, attr), f"tensormem.{name}.__all__ lists {attr!r} but the module has no such name"

def test_modidx_matches_modules():
    "Every module nbdev exported is in the package and every package module came from a notebook."
    from tensormem._modidx import d
    exported = {k.split('.')[1] for k in d['syms'] if k.count('.') >= 1}
    assert exported <= set(MODULES), exported - set(MODULES)

SPEC_NAMES = {'quaternion': ['qmul', 'qconj', 'hurwitz_units', 'nearest_hurwitz'],
              'hqmq': ['HQMQ', 'kv_cache_bytes'], 'baselines': ['NaiveInt', 'KIVI', 'TurboQuantLike'],
              'hf_cache': ['QuantizedKVCache'], 'fastweight': ['write_tokens', 'write_chunk_mean', 'write_scan'],
              'tensor_cache': ['TensorCacheAttention'],
              'tensor_memory': ['soft_write', 'trilinear_read', 'TensorMemory', 'attach_memory', 'detach_memory']}

@pytest.mark.parametrize('mod,names', [(m, n) for m, n in SPEC_NAMES.items() if m in MODULES])
def test_spec_public_names(mod, names):
    "SPEC.md §0: the names every notebook, doc page and test relies on."
    m = importlib.import_module(f'tensormem.{mod}')
    for n in names: assert callable(getattr(m, n)), f"tensormem.{mod}.{n} missing"

def test_cli_lists_jobs(capsys):
    from tensormem.cli import main, JOBS
    assert main([]) == 0
    out = capsys.readouterr().out
    for grp, job in JOBS: assert f"tensormem {grp} {job}" in out
    for mod, fn, _ in JOBS.values(): assert callable(getattr(importlib.import_module(mod), fn))
