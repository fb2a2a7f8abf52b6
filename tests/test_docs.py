"""The documentation site builds with no broken link, and the license and citation files say what they must."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def pyproject_field(name: str) -> str:
    """A top-level string field of pyproject.toml's [project] table (tomllib is Python 3.11+; 3.10 is supported)."""
    return re.search(rf"^{name} = (.+)$", (ROOT / "pyproject.toml").read_text(), flags=re.M).group(1)


def version() -> str:
    return pyproject_field("version").strip('"')


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("mkdocs", reason="mkdocs is in the dev extra: pip install -e '.[dev]'")
    command = [
        sys.executable,
        "-m",
        "mkdocs",
        "build",
        "--strict",
        "--config-file",
        str(config),
        "--site-dir",
        str(site),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_the_site_builds_strict_with_every_page(tmp_path):
    result = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    nav = [next(iter(entry.values())) for entry in yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]]
    pages = sorted(path.name for path in (ROOT / "docs").glob("*.md"))
    assert sorted(nav) == pages  # every page is in the nav, and the nav names no missing page
    for page in nav:
        assert (tmp_path / "site" / ("" if page == "index.md" else page.removesuffix(".md")) / "index.html").is_file()


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("[gone](no-such-page.md)", "no-such-page.md"),
        ("[gone](data.md#no-such-section)", "no-such-section"),
    ],
)
def test_a_broken_link_fails_the_build(tmp_path, breakage, message):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    index = copy / "docs" / "index.md"
    index.write_text(index.read_text() + f"\n{breakage}\n")
    result = mkdocs_build(copy / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


def test_citation_cff_has_the_required_keys_and_the_package_version():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    for key in ("cff-version", "message", "title", "authors", "version", "license", "preferred-citation"):
        assert key in cff, key
    assert cff["cff-version"] == "1.2.0"
    assert str(cff["version"]) == version()
    assert cff["license"] == "MIT"
    paper = cff["preferred-citation"]
    for key in ("type", "title", "authors", "year"):
        assert key in paper, key
    assert paper["title"] == (
        "Lost in Space: Probing Fine-grained Spatial Understanding in Vision and Language Resamplers"
    )
    assert [author["family-names"] for author in paper["authors"]] == ["Pantazopoulos", "Suglia", "Lemon", "Eshghi"]
    assert paper["year"] == 2024 and "2404.13594" in paper["url"]


def test_the_citing_page_names_the_package_version():
    text = (ROOT / "docs" / "citing.md").read_text()
    assert f"version = {{{version()}}}" in text
    assert "eprint        = {2404.13594}" in text


def test_license_is_mit_as_the_package_says():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 The probing authors\n")
    assert pyproject_field("license") == '{ text = "MIT" }'
