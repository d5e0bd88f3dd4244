"""Print one of the README's two opening commands: `demo` (the first) or `test` (the second)."""

import re
import sys
from pathlib import Path

readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
commands = re.findall(r"```(?:bash|sh)\n(.+?)\n```", readme, flags=re.S)[:2]
if len(commands) < 2 or sys.argv[1:] not in (["demo"], ["test"]):
    sys.exit("usage: readme_command.py demo|test (the README must open with two ```bash blocks)")
print(commands[0 if sys.argv[1] == "demo" else 1].strip())
