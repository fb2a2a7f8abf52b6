"""Report tables as paste-ready LaTeX: booktabs rules, a caption and a `\\label`, numeric columns right-aligned,
grouped (`\\multicolumn`) headers over a task's splits or a model's modes, and source lines short enough to edit.

pandas' Styler writes the table (escaping, booktabs rules, caption, label, multi-level headers); this module
only chooses the column alignment and the header groups, adds booktabs' `\\cmidrule` under each group (Styler
has no option for it) and breaks long rows at their column separators.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterable, Sequence

LINE_WIDTH = 100  # a source line longer than this is broken at its `&`s, one cell per line
WIDE_TABLE = 4  # columns: more, and the table takes the page's width (`table*`)

# A caption's own "Table 1: " (the Markdown heading's numbering): LaTeX numbers its tables itself.
_NUMBERING = re.compile(r"^Table \d+:\s*")
# A cell that reads as a number: digits, a signed number, a percentage with its interval, or a dash for none.
_NUMERIC = re.compile(r"^(?:[+-]?\d|–$|-$)")
# A column separator (an escaped `\&` inside a cell is not one).
_SEPARATOR = re.compile(r"(?<!\\) & ")

_SPECIALS = {c: f"\\{c}" for c in "&%$#_{}"} | {
    "~": "\\textasciitilde{}",
    "^": "\\textasciicircum{}",
    "\\": "\\textbackslash{}",
}


def escape(text: str) -> str:
    """Text escaped for LaTeX (Styler escapes the cells and headers, not the caption)."""
    return "".join(_SPECIALS.get(c, c) for c in text)


def caption(title: str) -> str:
    """The caption of a table titled `title`: without the title's own numbering, which LaTeX adds."""
    return escape(_NUMBERING.sub("", title))


def header_groups(
    headers: Sequence[str], prefixes: Iterable[str] = (), suffixes: Iterable[str] = ()
) -> list[tuple[str, str]] | None:
    """(group, header) per column: a header that starts with one of `prefixes` (a task's title: "VSR val (acc)")
    or ends with one of `suffixes` (a mode: "BLIP-2 frozen") is shown under that task or model; None when no
    header groups."""
    prefixes = sorted(prefixes, key=len, reverse=True)  # the longest first: "RefCOCOg val" before "RefCOCO"
    suffixes = sorted(suffixes, key=len, reverse=True)
    groups: list[tuple[str, str]] = []
    for header in headers:
        prefix = next((p for p in prefixes if header.startswith(p + " ")), None)
        suffix = next((s for s in suffixes if header.endswith(" " + s)), None)
        if prefix is not None:
            groups.append((prefix, header[len(prefix) + 1 :]))
        elif suffix is not None:
            groups.append((header[: -len(suffix) - 1], suffix))
        else:
            groups.append(("", header))
    return groups if any(group for group, _ in groups) else None


def column_format(rows: Sequence[Sequence[str]], columns: int) -> str:
    """`l` for a column of labels, `r` for one whose every cell reads as a number (or a dash for none)."""
    numeric = [
        bool(rows) and all(_NUMERIC.match(row[i].strip()) for row in rows if row[i].strip()) for i in range(columns)
    ]
    return "".join("r" if is_number else "l" for is_number in numeric)


def _cmidrules(groups: list[tuple[str, str]]) -> str:
    """booktabs' `\\cmidrule` under each header group (columns counted from 1)."""
    rules, start = [], 0
    for index in range(1, len(groups) + 1):
        if index == len(groups) or groups[index][0] != groups[start][0]:
            if groups[start][0]:
                rules.append(f"\\cmidrule(lr){{{start + 1}-{index}}}")
            start = index
    return " ".join(rules)


def _break(line: str) -> str:
    """A row longer than LINE_WIDTH, one cell per source line (LaTeX reads it the same)."""
    if len(line) <= LINE_WIDTH:
        return line
    return "\n  & ".join(_SEPARATOR.split(line))


def latex_table(
    name: str,
    title: str,
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    notes: Sequence[str] = (),
    groups: list[tuple[str, str]] | None = None,
) -> str:
    """The table as a LaTeX `table` (`table*` past WIDE_TABLE columns) labelled `tab:<name>`, its notes as a
    comment block above it."""
    import pandas as pd

    if groups is not None:
        columns = pd.MultiIndex.from_tuples(groups)
    else:
        columns = pd.Index(list(headers))
    frame = pd.DataFrame([list(row) for row in rows], columns=columns)
    styler = frame.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
    text = styler.to_latex(
        hrules=True,
        caption=caption(title),
        label=f"tab:{name}",
        column_format=column_format(rows, len(headers)),
        multicol_align="c",
        position_float="centering",
        environment="table*" if len(headers) > WIDE_TABLE else None,
    )
    lines = text.splitlines()
    if groups is not None:  # the group row follows \toprule: booktabs' partial rules under each group
        top = lines.index("\\toprule")
        lines.insert(top + 2, _cmidrules(groups))
    comments = [f"% {line}" for note in notes for line in textwrap.wrap(note, LINE_WIDTH - 2)]
    return "\n".join([*comments, *(_break(line) for line in lines)]) + "\n"
