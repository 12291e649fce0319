"""Build what can be built of the docs site offline: nbdev's processing of every notebook (Python API — the CLI
tries to install Quarto), then nbconvert HTML of each processed notebook. Checks `_proc/_quarto.yml` is the root file."""
import filecmp, os, sys
from pathlib import Path
root = Path(__file__).resolve().parents[1]
os.chdir(root)
# nbconvert's HTML templates live in <prefix>/share/jupyter; inside a venv built on a system Python they are under the
# base prefix, which jupyter's path search does not look at by default
os.environ['JUPYTER_PATH'] = os.pathsep.join(p for p in [os.environ.get('JUPYTER_PATH'), str(Path(sys.base_prefix)/'share'/'jupyter')] if p)

def main():
    from nbdev.quarto import refresh_quarto_yml
    from nbdev.serve import proc_nbs
    import nbformat
    from nbconvert import HTMLExporter
    refresh_quarto_yml()                         # writes nbs/nbdev.yml; leaves our _quarto.yml (a symlink) alone
    assert (root/'nbs'/'_quarto.yml').resolve() == (root/'_quarto.yml').resolve(), "nbs/_quarto.yml must link to ../_quarto.yml"
    proc = Path(proc_nbs(n_workers=0, force=True))
    assert filecmp.cmp(proc/'_quarto.yml', root/'_quarto.yml', shallow=False), "_proc/_quarto.yml differs from the root _quarto.yml"
    for f in ('sidebar.yml', 'nbdev.yml', 'styles.css'): assert (proc/f).exists(), f"{f} missing from _proc"
    nbs = sorted(proc.glob('*.ipynb'))
    side = (root/'nbs'/'sidebar.yml').read_text()
    missing = [p.name for p in nbs if p.name not in side and not p.name.startswith('_')]
    assert not missing, f"notebooks missing from nbs/sidebar.yml: {missing}"
    listed = [l.strip()[2:] for l in side.splitlines() if l.strip().startswith('- ') and l.strip().endswith('.ipynb')]
    absent = [n for n in listed if not (root/'nbs'/n).exists()]
    out = root/'_docs'/'html'; out.mkdir(parents=True, exist_ok=True)
    exp = HTMLExporter()
    for p in nbs:
        body, _ = exp.from_notebook_node(nbformat.read(p, as_version=4))
        (out/p.with_suffix('.html').name).write_text(body)
    print(f"processed {len(nbs)} notebooks into {proc.name}/ and rendered each to HTML in _docs/html/"
          + (f" | sidebar entries not written yet: {absent}" if absent else ''))
    return 0

if __name__ == '__main__': sys.exit(main())
