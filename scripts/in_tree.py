"""Run one code tree's own `molae` command, whatever else would resolve the name `molae` (an editable install,
the current directory, PYTHONPATH):

    python scripts/in_tree.py TREE convert SRC --out DST ...      # TREE holds molae/ (e.g. .old, from git archive)

Used to measure an older commit's code beside this one's (scripts/cpu/peers.sh, scripts/gpu/pipeline_quality.py).
"""

import runpy
import sys
from pathlib import Path

tree = str(Path(sys.argv[1]).resolve())
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path.insert(0, tree)
sys.argv = ["molae", *sys.argv[2:]]
import molae  # noqa: E402

assert molae.__file__.startswith(tree + "/"), f"molae resolved to {molae.__file__}, not under {tree}"
runpy.run_module("molae.cli", run_name="__main__")
