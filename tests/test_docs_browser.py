"The offline docs check (scripts/check_docs.py) catches what it promises: each defect planted in a tiny page is reported."
import importlib.util, shutil
from pathlib import Path
import pytest

root = Path(__file__).resolve().parents[1]

@pytest.fixture(scope='module')
def cd():
    spec = importlib.util.spec_from_file_location('check_docs', root/'scripts'/'check_docs.py')
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    return m

def page(cd, body):
    "A page as check_docs renders one: MathJax from the local package, configured as nbconvert does, plus the probe."
    return f"""<html><head><meta charset="utf-8">
<script type="text/x-mathjax-config">MathJax.Hub.Config({{tex2jax: {{inlineMath: [['$','$']], processEscapes: true}}, messageStyle: 'none'}});</script>
<script src="{cd.MATHJAX.as_uri()}?config=TeX-AMS_CHTML-full"></script></head><body>{body}{cd.PROBE}</body></html>"""

@pytest.fixture(scope='module')
def report(cd, tmp_path_factory):
    "One browser run over a clean page and one page per planted defect (Chromium starts once per page: ~2 s each)."
    if not (shutil.which('chromium') and cd.MATHJAX.exists()): pytest.skip("needs chromium and libjs-mathjax")
    out = tmp_path_factory.mktemp('html'); cd.OUT = out
    img = out/'dot.png'; shutil.copy(root/'nbs'/'styles.css', out/'styles.css')
    import base64
    img.write_bytes(base64.b64decode('iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=='))
    pages = {
        'good': '<h2 id="top">Math</h2><p>Inline $a \\otimes b$ and $\\frac{1}{2}$.</p><img src="dot.png">'
                '<a href="other.html#top">ok</a><a href="#top">self</a><pre>x = [i](j)</pre>',
        'other': '<h2 id="top">Other</h2><a href="good.html">back</a><a href="https://example.com/x">external</a>',
        'rawtex': '<p>A formula the markdown broke: \\frac{1}{2} stays raw.</p>',
        'texerror': '<p>Bad: $\\frac{1}{$</p>',
        'badimg': '<img src="missing.png">',
        'deadlink': '<a href="nowhere.html">x</a><a href="other.html#no-such-anchor">y</a>',
        'traceback': '<pre>Traceback (most recent call last):\n  File "x", line 1\nValueError: boom</pre>',
        'codelink': '<pre><code>def f(x, # like [`check_tensor`](core.html#check_tensor)\n)</code></pre>',
    }
    paths = {}
    for name, body in pages.items():
        (out/f'{name}.html').write_text(page(cd, body)); paths[f'{name}.ipynb'] = out/f'{name}.html'
    return cd.browser_check(paths, budget_ms=15000)

def test_clean_page_passes(report):
    assert not [e for e in report if e.startswith(('good.html', 'other.html'))], report

@pytest.mark.parametrize('name,what', [('rawtex', 'raw TeX'), ('texerror', 'TeX error'), ('badimg', 'image did not load'),
                                       ('deadlink', 'dead link nowhere.html'), ('deadlink', 'dead anchor other.html#no-such-anchor'),
                                       ('traceback', 'traceback'), ('codelink', 'Markdown link inside a code block')])
def test_each_defect_is_reported(report, name, what):
    assert any(e.startswith(f'{name}.html') and what in e for e in report), report

def test_static_checks_find_links_in_signatures(cd):
    md = "```python\ndef f(x, # like [`check_tensor`](core.html#check_tensor)\n```\nprose [`a`](b.html) is fine"
    assert cd._md_code_links(md) == ["def f(x, # like [`check_tensor`](core.html#check_tensor)"]
    assert cd._md_code_links("```python\nm(ln[i](x))\n```") == []
