"""The README's two quick-start commands are the ones CI and users run: keep them true."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands():
    text = (ROOT / "README.md").read_text()
    return dict(re.findall(r"^# (install and run the \w+)\n(.+)$", text, flags=re.M))


def test_two_commands_one_for_the_demo_one_for_the_tests():
    commands = quick_start_commands()
    assert set(commands) == {"install and run the demo", "install and run the tests"}
    assert commands["install and run the demo"].endswith("probing demo")
    assert "pip install -e ." in commands["install and run the demo"]
    assert 'pip install -e ".[dev]"' in commands["install and run the tests"]
    assert "pytest" in commands["install and run the tests"]
    assert "ruff check ." in commands["install and run the tests"]  # lint and format are part of CI
    assert "ruff format --check ." in commands["install and run the tests"]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "grep -A1 -x '# install and run the tests' README.md" in ci
    assert (ROOT / ".ci" / "run").stat().st_mode & 0o111
