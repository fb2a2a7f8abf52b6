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


README_MAX_LINES = 250  # a front page: the rest lives in docs/


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def relative_links(text: str) -> list[str]:
    """The targets of Markdown links and images that are not URLs or in-page anchors."""
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [target for target in targets if not re.match(r"[a-z][a-z0-9+.-]*:|#", target)]


def test_every_relative_link_of_the_readme_resolves():
    links = relative_links((ROOT / "README.md").read_text())
    assert "docs/index.md" in links and "LICENSE" in links  # the parser finds the links it is meant to check
    missing = [link for link in links if not (ROOT / link.split("#")[0]).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_relative_link_parser_tells_a_missing_file():
    links = relative_links("[a](docs/none.md) [b](https://x.org/a.md) [c](#top) ![d](docs/annotate.png)")
    assert links == ["docs/none.md", "docs/annotate.png"]
    assert not (ROOT / links[0]).exists()


def test_the_paper_results_block_is_what_the_command_writes():
    from probing.report import docs_blocks

    text = (ROOT / "README.md").read_text()
    assert docs_blocks.block_pattern("paper-results").search(text), "README.md lost its paper-results block"
    assert docs_blocks.rewritten(text) == text, "stale block: run `python -m probing.report.docs_blocks`"
    assert docs_blocks.main(["--check"]) == 0


def test_the_paper_results_block_holds_the_papers_table1():
    from probing.report import docs_blocks
    from probing.report.tables import PAPER_TABLE1

    block = docs_blocks.paper_results_block().splitlines()
    assert block[0] == "| model | mode | RefCOCOg (Acc@0.5) | VSR (accuracy) | RCM (accuracy) |"
    assert block[2] == "| BLIP-2 | frozen | 30.26 | 64.97 | 69.49 |"
    assert block[-1] == "| Human | human | – | 95.40 | 92.29 |"  # the paper gives no human RefCOCOg number
    assert len(block) == 2 + len(PAPER_TABLE1)


def test_a_stale_block_is_rewritten_and_the_check_fails(tmp_path, monkeypatch, capsys):
    from probing.report import docs_blocks

    stale = "intro\n<!-- begin paper-results -->\n| old | table |\n<!-- end paper-results -->\nafter\n"
    fresh = docs_blocks.rewritten(stale)
    assert fresh == (
        "intro\n<!-- begin paper-results -->\n"
        + docs_blocks.paper_results_block()
        + "\n<!-- end paper-results -->\nafter\n"
    )
    assert docs_blocks.rewritten(fresh) == fresh  # rewriting is idempotent
    readme = tmp_path / "README.md"
    readme.write_text(stale)
    monkeypatch.setattr(docs_blocks, "README", readme)
    assert docs_blocks.main(["--check"]) == 1
    assert "a generated block is stale; run `python -m probing.report.docs_blocks`" in capsys.readouterr().err
    assert readme.read_text() == stale  # --check writes nothing
    assert docs_blocks.main([]) == 0
    assert readme.read_text() == fresh
    assert docs_blocks.main(["--bogus"]) == 2
