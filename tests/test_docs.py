"""The README is a short front door, the docs stand alone: every relative link resolves inside the
repository, nothing points at ../shared (a clone has no such folder), and every `iqa` command is in
the README's table."""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 150
SKIPPED = {"tests", "build", "iqa-cache", "__pycache__"}
OUTSIDE = re.compile(r"\.\./shared|\bshared/(SPEC\.md|paper|notes|labels|reference)\b")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code, where Markdown links and headings live."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchor(heading: str) -> str:
    """GitHub's id of a heading: lower case, punctuation dropped (inline code marks too), spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """Relative links of `page` to files missing or outside `root`, or to headings its target lacks."""
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto: leave the repository on purpose
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or root not in (linked, *linked.parents):
            broken.append(f"{page.name}: {target} (no such file in the repository)")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{page.name}: {target} (no heading #{fragment} in {linked.name})")
    return broken


def test_readme_is_a_short_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move reference material into docs/"
    assert lines[0] == "# iqa" and "iqa demo" in lines[3] and "python -m pytest" in lines[4]
    assert len(DOC_PAGES) >= 10 and "](docs/" in README.read_text()


@pytest.mark.parametrize("page", [README, *DOC_PAGES], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    assert not broken_links(page)


def test_a_broken_link_is_found(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    (root / "there.md").write_text("# A heading `with code`\n")
    (tmp_path / "outside.md").write_text("# Outside\n")
    page = root / "page.md"
    page.write_text("[ok](there.md#a-heading-with-code) [gone](missing.md) [bad anchor](there.md#nope) "
                    "`[in code](missing.md)` [web](https://example.org) [out](../outside.md)\n")
    found = [b.split(" (")[0] for b in broken_links(page, root)]
    assert found == ["page.md: missing.md", "page.md: there.md#nope", "page.md: ../outside.md"]


def repository_files():
    """Source and documentation files outside tests/ (which may read ../shared where it exists);
    caches, virtual environments and hidden folders are not walked."""
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIPPED and not d.startswith(".")]
        for name in files:
            if Path(name).suffix in {".py", ".md", ".toml", ".json"}:
                yield (Path(folder) / name).relative_to(ROOT)


def test_nothing_points_outside_the_repository():
    files = list(repository_files())
    assert Path("README.md") in files and Path("cli.py") in files
    pointing = [f"{f}:{n}" for f in files for n, line in enumerate((ROOT / f).read_text().splitlines(), 1)
                if OUTSIDE.search(line)]
    assert not pointing, f"these lines point at ../shared, which a clone does not have: {pointing}"


def command_names(app, prefix: str = "iqa") -> list[str]:
    """Every command of a typer app, sub-commands included, as typed: `iqa data prepare`, `iqa extract`, ..."""
    names = [f"{prefix} {c.name or c.callback.__name__.replace('_', '-')}" for c in app.registered_commands]
    for group in app.registered_groups:
        names += command_names(group.typer_instance, f"{prefix} {group.name}")
    return names


def test_the_readme_lists_every_command():
    from iqa.cli import app

    names = command_names(app)
    assert "iqa data prepare" in names and "iqa cache verify" in names and "iqa head" in names
    table = [line for line in README.read_text().splitlines() if line.startswith("| `iqa ")]
    missing = [n for n in names if not any(line.startswith(f"| `{n}`") or line.startswith(f"| `{n} ") for line in table)]
    assert not missing, f"commands missing from the README's table: {missing}"
