"Write README.md from nbs/index.ipynb (nbdev_readme needs Quarto, which these machines cannot install)."
import configparser, json, re, sys
from pathlib import Path

root = Path(__file__).resolve().parents[1]

def site_url() -> str:
    cfg = configparser.ConfigParser(); cfg.read(root/'settings.ini')
    return cfg['DEFAULT']['doc_host'].rstrip('/') + '/' + cfg['DEFAULT']['doc_baseurl'].strip('/') + '/'

def absolute_links(md:str) -> str:
    "Links to docs pages (`hqmq.html`, `tutorials/kv_cache.html#x`) made absolute: the README is also read on GitHub and PyPI."
    return re.sub(r'\]\((?!https?:|#|/)([\w./-]+\.html(?:#[^)\s]*)?)\)', lambda m: f"]({site_url()}{m.group(1)})", md)

def readme_text() -> str:
    nb = json.loads((root/'nbs'/'index.ipynb').read_text())
    out = []
    for c in nb['cells']:
        src = ''.join(c['source'])
        if src.lstrip().startswith('#| hide'): continue
        if c['cell_type'] == 'markdown':
            src = re.sub(r'^> (.*)$', r'> \1', src, flags=re.M)
            out.append(absolute_links(src))
        else:
            out.append('```python\n' + src + '\n```')
            for o in c.get('outputs', []):
                txt = ''.join(o.get('text', '')) or ''.join(o.get('data', {}).get('text/plain', ''))
                if txt: out.append('    ' + txt.rstrip().replace('\n', '\n    '))
    return '<!-- generated from nbs/index.ipynb by scripts/readme.py; edit the notebook -->\n\n' + '\n\n'.join(out) + '\n'

if __name__ == '__main__':
    txt = readme_text()
    if '--check' in sys.argv:
        ok = (root/'README.md').read_text() == txt
        print('README.md is in sync with nbs/index.ipynb' if ok else 'README.md is stale: run python scripts/readme.py')
        sys.exit(0 if ok else 1)
    (root/'README.md').write_text(txt); print('wrote README.md')
