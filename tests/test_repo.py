"The repository's promises about itself: README commands, CI entry, settings and packaging agree."
import configparser, re, subprocess, sys, zipfile
from pathlib import Path
import pytest

root = Path(__file__).resolve().parents[1]

def readme_commands():
    return re.findall(r'```sh\n(.*?)\n```', (root/'README.md').read_text(), flags=re.S)

def test_readme_has_two_commands_and_ci_runs_the_test_one():
    cmds = [c for c in readme_commands() if 'scripts/setup.sh' in c]
    assert len(cmds) == 2, cmds
    run_cmd, test_cmd = cmds
    assert 'tensormem ' in run_cmd
    ci = (root/'.ci'/'run').read_text()
    assert test_cmd.strip() in ci, f".ci/run must run the README's test command {test_cmd!r}"

def test_readme_in_sync_with_index():
    r = subprocess.run([sys.executable, str(root/'scripts'/'readme.py'), '--check'], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

def test_main_job_is_a_registered_cli_job():
    from tensormem.cli import JOBS
    run_cmd = [c for c in readme_commands() if 'scripts/setup.sh' in c][0]
    grp, job = re.search(r'tensormem (\w+) (\w+)', run_cmd).groups()
    assert (grp, job) in JOBS

def test_settings_flags_match_pytest_markers():
    cfg = configparser.ConfigParser(); cfg.read(root/'settings.ini')
    flags = set(cfg['DEFAULT']['tst_flags'].split())
    markers = (root/'pytest.ini').read_text()
    for f in flags - {'notest'}: assert re.search(rf'^\s+{f}:', markers, flags=re.M), f"pytest marker {f} missing"

def test_quarto_yml_single_source():
    link = root/'nbs'/'_quarto.yml'
    assert link.is_symlink() and link.resolve() == (root/'_quarto.yml').resolve()

def test_wheel_builds_and_imports(tmp_path):
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', str(tmp_path), str(root)], check=True)
    whl = next(tmp_path.glob('tensormem-*.whl'))
    names = zipfile.ZipFile(whl).namelist()
    assert 'tensormem/quaternion.py' in names and any(n.endswith('entry_points.txt') for n in names)
    env_dir = tmp_path/'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', str(env_dir), str(whl)], check=True)
    out = subprocess.run([sys.executable, '-c', 'import tensormem; print(tensormem.__version__, tensormem.__file__)'],
                         capture_output=True, text=True, check=True, cwd=tmp_path, env={'PYTHONPATH': str(env_dir), 'PATH': '/usr/bin:/bin'})
    cfg = configparser.ConfigParser(); cfg.read(root/'settings.ini')
    ver, path = out.stdout.split()
    assert ver == cfg['DEFAULT']['version'] and str(env_dir) in path


def test_docs_processing_runs_no_computation():
    "nbdev's docs processing executes every cell that contains an import (and every exported cell): such cells may only import and define."
    import ast, json
    bad = []
    for f in sorted((root/'nbs').glob('*.ipynb')):
        for i, c in enumerate(json.loads(f.read_text())['cells']):
            src = ''.join(c['source'])
            if c['cell_type'] != 'code' or 'nbdev_export()' in src: continue
            dirs = [l[3:].strip() for l in src.splitlines() if l.startswith('#| ')]
            if any(d.split()[0] in ('export', 'exports', 'exporti', 'exec_doc') for d in dirs if d) or 'eval: false' in dirs: continue
            try: tree = ast.parse('\n'.join(l for l in src.splitlines() if not l.lstrip().startswith(('!', '%'))))
            except SyntaxError: continue
            if not any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree)): continue
            allowed = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
            if not all(isinstance(s, allowed) for s in tree.body): bad.append(f"{f.name} cell {i}: {src[:80]!r}")
    assert not bad, "cells mixing imports with other code (docs processing would run them):\n" + "\n".join(bad)
