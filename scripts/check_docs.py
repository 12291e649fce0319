"""Build and check what can be built of the docs site offline (Quarto cannot be installed on these machines).

1. nbdev's processing of every notebook (its Python API: the CLI tries to install Quarto), one notebook at a time so that
   every failing notebook is named, not just the first.
2. Static checks of the processed notebooks: the sidebar lists every notebook exactly once and nothing else; no error
   output (traceback) is committed; no Markdown link inside a code block (a show_doc signature whose parameter comment
   was linkified: see `doc_links` in nbs/00_core.ipynb).
3. Each processed notebook rendered to HTML with nbconvert into _docs/html/, under the page name Quarto gives it
   (`03_hqmq.ipynb` -> `hqmq.html`), with MathJax served from the local Debian package (libjs-mathjax).
4. With --browser: every page opened in headless Chromium (no network) after MathJax typeset it; fails on raw TeX
   left in the text, TeX errors, images that did not load, tracebacks and dead internal links (file and anchor).
   --screenshot PAGE also writes a PNG of that page to _docs/html/PAGE.png, to look at.
Exit status 0 when everything passes; the failures are listed otherwise.
"""
import argparse, json, os, re, shutil, subprocess, sys, time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

root = Path(__file__).resolve().parents[1]
os.chdir(root)
# nbconvert's HTML templates live in <prefix>/share/jupyter; inside a venv built on a system Python they are under the
# base prefix, which jupyter's path search does not look at by default
os.environ['JUPYTER_PATH'] = os.pathsep.join(p for p in [os.environ.get('JUPYTER_PATH'), str(Path(sys.base_prefix)/'share'/'jupyter')] if p)
MATHJAX = Path('/usr/share/javascript/mathjax/MathJax.js')   # Debian's libjs-mathjax (MathJax 2.7)
OUT = root/'_docs'/'html'

# ---------------------------------------------------------------------------------------------------- 1. processing
def process(only=None):
    "nbdev's docs processing, notebook by notebook, into _proc/. Returns (proc dir, [(notebook, error line)])."
    from nbdev.config import get_config
    from nbdev.quarto import refresh_quarto_yml
    from nbdev.serve import _proc_file
    from nbdev.serve_drv import main as proc_one
    from nbdev.doclinks import nbglob
    refresh_quarto_yml()                         # writes nbs/nbdev.yml; leaves our _quarto.yml (a symlink) alone
    assert (root/'nbs'/'_quarto.yml').resolve() == (root/'_quarto.yml').resolve(), "nbs/_quarto.yml must link to ../_quarto.yml"
    cfg = get_config(); nbs = Path(cfg.nbs_path); proc = cfg.config_path/'_proc'
    shutil.rmtree(proc, ignore_errors=True); proc.mkdir()
    files = list(nbglob(nbs, func=Path, file_glob='', file_re='')) + [nbs/'_quarto.yml']
    fails = []
    for f in files:
        if only and f.suffix == '.ipynb' and not f.match(only): continue
        item = _proc_file(f, cache=proc, path=nbs)
        if item is None: continue                 # plain files are copied by _proc_file itself
        try: proc_one(item)
        except Exception as e:
            msg = str(e).strip().splitlines()
            fails.append((str(f.relative_to(nbs)), ' | '.join(msg[:3])[:300]))
        finally: os.environ.pop('IN_TEST', None)  # nbdev sets it per notebook and leaves it behind on an error
    for f in ('_quarto.yml', 'sidebar.yml', 'nbdev.yml', 'styles.css'): assert (proc/f).exists(), f"{f} missing from _proc"
    return proc, fails

def notebooks(d):
    "Notebooks under `d` that are pages (no `_`-prefixed files or folders), as paths relative to `d`."
    return sorted(p.relative_to(d) for p in d.rglob('*.ipynb')
                  if not any(s.startswith(('_', '.')) for s in p.relative_to(d).parts))

# ---------------------------------------------------------------------------------------------------- 2. static checks
def sidebar_entries(text):
    return [l.strip()[2:].strip() for l in text.splitlines() if l.strip().startswith('- ') and l.strip().endswith('.ipynb')]

def check_sidebar():
    "Every notebook page in the sidebar exactly once, every sidebar entry an existing notebook."
    nbs = root/'nbs'; listed = sidebar_entries((nbs/'sidebar.yml').read_text())
    have = {str(p) for p in notebooks(nbs)}
    errs = [f"sidebar.yml: {n} listed {listed.count(n)} times" for n in sorted(set(listed)) if listed.count(n) > 1]
    errs += [f"sidebar.yml: {n} is not in the sidebar" for n in sorted(have - set(listed))]
    errs += [f"sidebar.yml: {n} does not exist" for n in listed if n not in have]
    return errs

_fence_link = re.compile(r'\[`[^`\]\n]+`\]\([^)\s]+\)')   # nbdev's links: [`name`](url)

def _md_code_links(md):
    "Markdown links inside ``` fences of a Markdown text."
    bad, fence = [], False
    for l in md.splitlines():
        if l.startswith('```'): fence = not fence
        elif fence and _fence_link.search(l): bad.append(l.strip())
    return bad

def check_processed(proc):
    "Committed error outputs, and Markdown links inside code blocks, in the processed notebooks."
    errs = []
    for rel in notebooks(proc):
        nb = json.loads((proc/rel).read_text())
        for i, c in enumerate(nb['cells']):
            for o in c.get('outputs', []):
                if o.get('output_type') == 'error': errs.append(f"{rel} cell {i}: error output {o.get('ename')}: {o.get('evalue', '')[:100]}")
                txt = ''.join(o.get('text', ''))
                if 'Traceback (most recent call last)' in txt: errs.append(f"{rel} cell {i}: traceback in output")
                md = o.get('data', {}).get('text/markdown')
                if md:
                    for l in _md_code_links(''.join(md)): errs.append(f"{rel} cell {i}: Markdown link inside a code block: {l[:120]}")
    return errs

# ---------------------------------------------------------------------------------------------------- 3. HTML
PROBE = """<script>
window.addEventListener('load', function () {
  document.querySelectorAll('img').forEach(function (i) { if (!i.complete || i.naturalWidth === 0) i.setAttribute('data-broken', '1'); });
  var done = function () { document.body.setAttribute('data-check', 'done'); };
  if (window.MathJax && MathJax.Hub) MathJax.Hub.Queue(done); else document.body.setAttribute('data-check', 'no-mathjax');
});
</script>
"""

def page_name(proc, rel):
    "The HTML path Quarto writes for notebook `rel`: its frontmatter's `output-file`, in the notebook's folder."
    nb = json.loads((proc/rel).read_text())
    for c in nb['cells'][:1]:
        m = re.search(r'^output-file:\s*(\S+)', ''.join(c['source']), flags=re.M)
        if m: return str(Path(rel).parent/m.group(1))
    return str(Path(rel).with_suffix('.html'))

def _as_quarto(nb):
    "Approximate what Quarto shows: the frontmatter as a title, no input for `echo: false` cells, no `#|` lines."
    import nbformat
    for c in nb.cells:
        src = c.source
        if c.cell_type == 'raw' and src.startswith('---'):
            import yaml
            fm = yaml.safe_load(src.strip().strip('-')) or {}
            c.cell_type, c.source = 'markdown', f"# {fm.get('title', '')}" + (f"\n\n> {fm['description']}" if fm.get('description') else '')
            c.pop('outputs', None); c.pop('execution_count', None)
        elif c.cell_type == 'code':
            if re.search(r'^#\| *echo: *false', src, flags=re.M): c.metadata.setdefault('tags', []).append('remove_input')
            c.source = '\n'.join(l for l in src.splitlines() if not l.startswith('#|'))
            for o in c.get('outputs', []):
                md = o.get('data', {}).get('text/markdown')
                if md: o['data']['text/markdown'] = re.sub(r'\{target="_blank"[^}]*\}', '', ''.join(md))
    return nbformat.from_dict(nb)

def render(proc):
    "nbconvert each processed notebook to _docs/html/<page>, MathJax local, nothing loaded from the network."
    import nbformat
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import TagRemovePreprocessor
    shutil.rmtree(OUT, ignore_errors=True); OUT.mkdir(parents=True)
    exp = HTMLExporter(mathjax_url=MATHJAX.as_uri() + '?config=TeX-AMS_CHTML-full', exclude_input_prompt=True, exclude_output_prompt=True)
    exp.register_preprocessor(TagRemovePreprocessor(remove_input_tags={'remove_input'}), enabled=True)
    pages = {}
    for rel in notebooks(proc):
        body, _ = exp.from_notebook_node(_as_quarto(nbformat.read(proc/rel, as_version=4)))
        body = re.sub(r'<script src="https?://[^"]*require[^"]*"></script>', '', body)   # widget loader from a CDN: unused
        body = body.replace('</body>', PROBE + '</body>')
        dst = OUT/page_name(proc, rel); dst.parent.mkdir(parents=True, exist_ok=True); dst.write_text(body)
        pages[str(rel)] = dst
    return pages

# ---------------------------------------------------------------------------------------------------- 4. browser
VOID = {'area', 'base', 'br', 'col', 'embed', 'hr', 'img', 'input', 'link', 'meta', 'source', 'track', 'wbr'}
SKIP = {'script', 'style', 'pre', 'code', 'textarea', 'svg', 'math'}
_tex = re.compile(r'(?<![\w$])\$[^$\n]{1,200}\$(?![\w$])|\\(?:frac|sum|prod|mathbf|mathrm|mathcal|tfrac|sqrt|lambda|sigma|otimes|langle|rangle|begin|end|left|right|cdot|le|ge|in|to)\b')

def anchor(s):
    "An anchor as Quarto (pandoc) spells a heading's id, so nbconvert's ids and nbdev's links compare: lower case, no punctuation."
    return re.sub(r'[^\w.-]', '', re.sub(r'\s+', '-', s.strip().lower()))

class Page(HTMLParser):
    "What the checks need from a dumped DOM: text outside code and math, links, ids, broken images, code blocks."
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.text, self.hrefs, self.ids, self.broken, self.code, self.tex_errors = [], [], [], set(), [], [], 0
        self.state = None
    def _skipping(self):
        return any(t in SKIP or 'MathJax' in c or 'mjx-' in c or 'MJX' in c for t, c in self.stack)
    def handle_starttag(self, tag, attrs):
        a = dict(attrs); cls = a.get('class') or ''
        if a.get('id'): self.ids.add(anchor(a['id']))
        if a.get('name'): self.ids.add(anchor(a['name']))
        if tag == 'a' and a.get('href') and 'anchor-link' not in cls: self.hrefs.append(a['href'])   # not nbconvert's ¶
        if tag == 'img' and a.get('data-broken') and not re.match(r'https?:', a.get('src') or ''):   # no network here
            self.broken.append((a.get('src') or '')[:80])
        if tag == 'body': self.state = a.get('data-check')
        if 'mjx-noError' in cls or 'mjx-merror' in cls or 'MathJax_Error' in cls: self.tex_errors += 1
        if tag not in VOID: self.stack.append((tag, cls))
    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag: del self.stack[i:]; break
    def handle_data(self, d):
        if any(t in ('pre', 'code') for t, _ in self.stack): self.code.append(d)
        if not self._skipping(): self.text.append(d)

def dump_dom(chrome, url, budget_ms):
    args = [chrome, '--headless', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run',
            '--host-resolver-rules=MAP * ~NOTFOUND', '--allow-file-access-from-files',
            f'--virtual-time-budget={budget_ms}', '--dump-dom', url]
    return subprocess.run(args, capture_output=True, text=True, timeout=120).stdout

def screenshot(chrome, url, png, budget_ms):
    args = [chrome, '--headless', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--hide-scrollbars',
            '--host-resolver-rules=MAP * ~NOTFOUND', '--allow-file-access-from-files', '--window-size=1100,1400',
            f'--virtual-time-budget={budget_ms}', f'--screenshot={png}', url]
    subprocess.run(args, capture_output=True, timeout=120)

SITE = 'https://tensormem.github.io/tensormem/'

def resolve(page, href, nb2page):
    "The local file and anchor an internal link points to, or None for an external one."
    if href.startswith(SITE): href = '/' + href[len(SITE):]
    u = urlsplit(href)
    if u.scheme or u.netloc: return None
    if not u.path: return page, unquote(u.fragment)
    base = OUT if u.path.startswith('/') else page.parent
    target = (base/unquote(u.path).lstrip('/')).resolve()
    if target.suffix == '.ipynb':   # Quarto turns links to notebooks into links to their pages
        rel = os.path.relpath(target, (root/'nbs').resolve())
        target = nb2page.get(rel, target.with_suffix('.html'))
    return target, unquote(u.fragment)

def browser_check(pages, budget_ms=20000, shot=None, partial=False):
    chrome = shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome')
    if not chrome: return ["--browser: no chromium on PATH (bash scripts/setup.sh installs Debian's chromium)"]
    if not MATHJAX.exists(): return [f"--browser: {MATHJAX} missing (bash scripts/setup.sh installs Debian's libjs-mathjax)"]
    errs, parsed = [], {}
    nb2page = {rel: dst.resolve() for rel, dst in pages.items()}
    for rel, dst in pages.items():
        p = Page(); p.feed(dump_dom(chrome, dst.resolve().as_uri(), budget_ms)); parsed[dst.resolve()] = p
        name = dst.relative_to(OUT)
        if p.state != 'done': errs.append(f"{name}: page did not finish loading/typesetting in {budget_ms} ms of virtual time (state {p.state})")
        text = ' '.join(''.join(p.text).split())
        for m in list(_tex.finditer(text))[:5]: errs.append(f"{name}: raw TeX after typesetting: ...{text[max(0, m.start()-40):m.end()+40]}...")
        if p.tex_errors: errs.append(f"{name}: {p.tex_errors} TeX error(s) in typeset math")
        for src in p.broken: errs.append(f"{name}: image did not load: {src}")
        if 'Traceback (most recent call last)' in ''.join(p.code) + text: errs.append(f"{name}: a traceback is shown")
        for l in _md_code_links('```\n' + '\n'.join(p.code) + '\n```'): errs.append(f"{name}: Markdown link inside a code block: {l[:120]}")
    for page, p in parsed.items():
        for href in sorted(set(p.hrefs)):
            r = resolve(page, href, nb2page)
            if r is None: continue
            target, frag = r
            if partial and target not in parsed: continue   # --only: that page was not built
            if target not in parsed and not target.exists(): errs.append(f"{page.relative_to(OUT)}: dead link {href}"); continue
            if frag and target in parsed and anchor(frag) not in parsed[target].ids:
                errs.append(f"{page.relative_to(OUT)}: dead anchor {href}")
    if shot:
        dst = OUT/shot; png = dst.with_suffix('.png')
        screenshot(chrome, dst.resolve().as_uri(), png, budget_ms); print(f"screenshot of {shot}: {png}")
    return errs

# ---------------------------------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--browser', action='store_true', help='open every rendered page in headless Chromium and check it')
    ap.add_argument('--screenshot', metavar='PAGE', help='with --browser: write a PNG of PAGE (e.g. quaternion.html)')
    ap.add_argument('--only', metavar='GLOB', help='while working on a page: only notebooks matching GLOB (e.g. 13_cli.ipynb)')
    ap.add_argument('--budget', type=int, default=20000, help='virtual-time budget per page in ms (MathJax must finish)')
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    proc, fails = process(a.only)
    errs = [f"{n}: docs processing failed: {m}" for n, m in fails]
    errs += (check_sidebar() if not a.only else []) + check_processed(proc)
    pages = render(proc)
    t1 = time.perf_counter()
    msg = f"processed and rendered {len(pages)} pages into _docs/html/ in {t1-t0:.0f} s"
    if a.browser:
        errs += browser_check(pages, a.budget, a.screenshot, partial=bool(a.only))
        msg += f"; browser check of every page {time.perf_counter()-t1:.0f} s"
    for e in errs: print('FAIL', e)
    print(msg + (f" | {len(errs)} problem(s)" if errs else " | all checks pass"))
    return 1 if errs else 0

if __name__ == '__main__': sys.exit(main())
