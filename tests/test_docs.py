"""The README and docs/ do not go stale unnoticed: every relative link resolves (anchors included), and
every `pipeline COMMAND --option` they show names a command and options that the CLI knows."""
import re
from pathlib import Path

import pytest
from typer.main import get_command

from pipeline.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CLI = get_command(app)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"(?m)^#+ (.+)$", strip_code(page.read_text()))}


def strip_code(text: str) -> str:
    return re.sub(r"(?s)```.*?```", "", text)


def links(page: Path):
    for target in re.findall(r"\]\(([^)\s]+)\)", strip_code(page.read_text())):
        if not re.match(r"[a-z]+:", target):
            yield target


def test_the_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
    assert len(PAGES) >= 10


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link {target} points to nothing"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{page.name}: link {target}: no heading #{anchor} in {dest.name}"


def command_lines(text: str):
    """Each `pipeline ...` invocation in code blocks (continuation lines joined, comments cut) and in
    inline code spans."""
    for block in re.findall(r"(?s)```[a-z]*\n(.*?)```", text):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s#\s", " " + line)[0]
            yield from re.findall(r"(?:^\s*|-m\s+|[\"'(]|&&\s*)pipeline\s+([a-z][\w-]*)([^\"&;]*)", line)
    for span in re.findall(r"`(pipeline\s[^`]+)`", strip_code(text)):
        yield from re.findall(r"^pipeline\s+([a-z][\w-]*)(.*)", span)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_shown_command_and_option_exists(page):
    seen = 0
    for name, rest in command_lines(page.read_text()):
        command = CLI.commands.get(name)
        assert command is not None, f"{page.name}: `pipeline {name}` is no command (known: {sorted(CLI.commands)})"
        known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
        for option in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest):
            assert option in known, f"{page.name}: `pipeline {name}` has no option {option}"
        seen += 1
    if page.name in ("README.md", "getting-started.md", "commands.md"):
        assert seen >= 5, page.name


def test_the_map_names_every_page():
    readme = (ROOT / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, f"README's map does not name docs/{page.name}"
