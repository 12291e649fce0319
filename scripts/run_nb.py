#!/usr/bin/env python3
"""Re-execute notebooks in place so their committed outputs come from a real run (then `nbdev_clean`).

`#| slow` and `#| cuda` cells are skipped (they keep their committed outputs) unless `--slow` / `--cuda` is given.
Usage: python scripts/run_nb.py nbs/03_hqmq.ipynb [more.ipynb ...] [--slow] [--cuda] [--only TEXT ...]
`--only TEXT` (with `--slow`): of the slow cells, run only those whose source contains one of the TEXTs (the others keep
their committed outputs), to refresh one section of a long page.
"""
import argparse, os, sys, time
from pathlib import Path

def flags(cell) -> set:
    "nbdev directives of a cell; `#| eval: false` counts as the flag 'noeval' (nbdev_test skips such cells too)."
    ds = [l[3:].strip() for l in cell.source.splitlines() if l.startswith('#| ') and len(l) > 3]
    return {d.split()[0] for d in ds} | ({'noeval'} if any(d.replace(' ', '') == 'eval:false' for d in ds) else set())

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('notebooks', nargs='+'); ap.add_argument('--slow', action='store_true'); ap.add_argument('--cuda', action='store_true')
    ap.add_argument('--only', action='append', default=[], metavar='TEXT')
    a = ap.parse_args(argv)
    from execnb.shell import CaptureShell
    skip = {'notest', 'noeval'} | ({'slow'} if not a.slow else set()) | ({'cuda'} if not a.cuda else set())
    os.environ.setdefault('MPLBACKEND', 'Agg'); os.environ.setdefault('PYTHONHASHSEED', '0')
    for nb in a.notebooks:
        p = Path(nb).resolve(); t0 = time.time(); cwd = os.getcwd(); os.chdir(p.parent)
        try: CaptureShell().execute(p, p, exc_stop=True, preproc=lambda c: c.cell_type == 'code' and (bool(flags(c) & skip) or
                        bool(a.only and 'slow' in flags(c) and not any(t in c.source for t in a.only))))
        finally: os.chdir(cwd)
        print(f"{p.name}: executed in {time.time() - t0:.0f} s")

if __name__ == '__main__': sys.exit(main())
