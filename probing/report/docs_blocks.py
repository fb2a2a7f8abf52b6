"""Blocks of README.md that a command writes, so that no number in them is typed by hand.

A block sits between `<!-- begin NAME -->` and `<!-- end NAME -->` lines.
`python -m probing.report.docs_blocks` rewrites every block from the tool's own data;
`python -m probing.report.docs_blocks --check` exits 1 when a block differs from what it would write (the tests run
the same check).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from probing.report.tables import PAPER_TABLE1
from probing.tasks import get_task

PAPER_TASKS = ("refcocog", "vsr", "rcm")  # the paper's Table 1 columns, in its order


def paper_results_block() -> str:
    """The paper's Table 1 (test, %) as Markdown, from the numbers `probing report --compare-paper` shows."""
    header = [
        "model",
        "mode",
        *(f"{get_task(name).title} ({get_task(name).head.metric_title})" for name in PAPER_TASKS),
    ]
    rows = []
    for (model, mode), values in PAPER_TABLE1.items():
        rows.append([model, mode, *(f"{values[name]:.2f}" if name in values else "–" for name in PAPER_TASKS)])
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * 2 + ["---:"] * len(PAPER_TASKS)) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


BLOCKS = {"paper-results": paper_results_block}
README = Path(__file__).resolve().parents[2] / "README.md"  # the repository's front page


def block_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(^<!-- begin {re.escape(name)} -->\n)(.*?)(^<!-- end {re.escape(name)} -->$)", re.M | re.S)


def rewritten(text: str) -> str:
    """`text` with every block present in it replaced by what its builder writes now."""
    for name, build in BLOCKS.items():
        body = build()
        text = block_pattern(name).sub(lambda match, body=body: match.group(1) + body + "\n" + match.group(3), text)
    return text


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    check = args == ["--check"]
    if args and not check:
        print("usage: python -m probing.report.docs_blocks [--check]", file=sys.stderr)
        return 2
    readme = README
    text = readme.read_text()
    new = rewritten(text)
    if check:
        if new != text:
            print(f"{readme}: a generated block is stale; run `python -m probing.report.docs_blocks`", file=sys.stderr)
            return 1
        return 0
    if new != text:
        readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
