"Import every exported module of the installed package and check the public names each promises."
import importlib, pkgutil, subprocess, sys
import pytest
import tensormem

MODULES = sorted(m.name for m in pkgutil.iter_modules(tensormem.__path__) if not m.name.startswith('_'))

def test_version():
    import configparser, pathlib
    cfg = configparser.ConfigParser(); cfg.read(pathlib.Path(__file__).parents[1]/'settings.ini')
    assert tensormem.__version__ == cfg['DEFAULT']['version']

def import_or_skip(name):
    "Import `name`; skip (not fail) when it needs a pip extra that is not installed, so `pip install .[dev]` passes."
    from tensormem.core import EXTRAS
    try: return importlib.import_module(name)
    except ImportError as e:
        if 'pip install "tensormem[' in str(e): pytest.skip(str(e))
        if isinstance(e, ModuleNotFoundError) and (e.name or '').split('.')[0] in EXTRAS:   # a module not using `require` yet
            pytest.skip(f"{name} needs {e.name}, from a pip extra that is not installed")
        raise

@pytest.mark.parametrize('name', MODULES)
def test_import_and_all(name):
    mod = import_or_skip(f'tensormem.{name}')
    for attr in getattr(mod, '__all__', []):
        assert hasattr(mod, attr), f"tensormem.{name}.__all__ lists {attr!r} but the module has no such name"

def test_modidx_matches_modules():
    "Every module nbdev exported is in the package and every package module came from a notebook."
    from tensormem._modidx import d
    exported = {k.split('.')[1] for k in d['syms'] if k.count('.') >= 1}
    assert exported <= set(MODULES), exported - set(MODULES)

PUBLIC_NAMES = {'quaternion': ['qmul', 'qconj', 'hurwitz_units', 'nearest_hurwitz'],
              'quant': ['kv_cache_bytes', 'pack_bits', 'outlier_mask', 'check_kv'], 'hqmq': ['HQMQ'], 'baselines': ['NaiveInt', 'KIVI', 'TurboQuantLike'],
              'hf_cache': ['QuantizedKVCache'], 'fastweight': ['write_tokens', 'write_chunk_mean', 'write_scan'],
              'tensor_cache': ['TensorCacheAttention'],
              'tensor_memory': ['soft_write', 'trilinear_read', 'TensorMemory', 'attach_memory', 'detach_memory']}

@pytest.mark.parametrize('mod,names', [(m, n) for m, n in PUBLIC_NAMES.items() if m in MODULES])
def test_spec_public_names(mod, names):
    "The public names every notebook, doc page and test relies on stay importable from these modules."
    m = import_or_skip(f'tensormem.{mod}')
    for n in names: assert callable(getattr(m, n)), f"tensormem.{mod}.{n} missing"

def test_cli_lists_jobs(capsys):
    from tensormem.cli import main, JOBS
    assert main([]) == 0
    out = capsys.readouterr().out
    for grp, job in JOBS: assert f"tensormem {grp} {job}" in out

@pytest.mark.parametrize('job', __import__('tensormem.cli', fromlist=['JOBS']).JOBS)
def test_cli_job_resolves(job):
    "Every registered job's module imports and has its entry function (skipped when the module needs a missing extra)."
    from tensormem.cli import JOBS
    mod, fn, _ = JOBS[job]
    assert callable(getattr(import_or_skip(mod), fn, None)), f"`tensormem {' '.join(job)}`: {mod} has no function {fn}"

@pytest.mark.parametrize('argv,msg', [(['nope', 'job'], "no job 'nope job'"), (['demo', 'quaternion', '--no-such-flag'], 'unrecognized arguments')])
def test_cli_usage_errors_are_one_line(argv, msg):
    "A user error: exit status 2 and a short message on stderr, never a traceback."
    r = subprocess.run([sys.executable, '-m', 'tensormem.cli', *argv], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and msg in r.stderr and 'Traceback' not in r.stderr, (r.returncode, r.stderr[-2000:])
