"Every notebook with an 'Open in Colab' badge has one install cell of one form, guarded to run only on Colab."
import subprocess, sys
from pathlib import Path

root = Path(__file__).resolve().parents[1]

def test_one_colab_install_cell_per_badge():
    r = subprocess.run([sys.executable, str(root/'scripts'/'colab.py'), '--check'], capture_output=True, text=True)
    assert r.returncode == 0, "run `python scripts/colab.py` to fix:\n" + r.stdout + r.stderr
