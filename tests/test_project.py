"""Project hygiene a new user meets first: CI runs the README's own test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(python3 -m venv .venv .*?)\n```", readme)
    test_command = [c for c in commands if "pytest" in c]
    assert len(test_command) == 1, commands
    assert test_command[0] in (ROOT / ".ci" / "run").read_text().splitlines()
