"""The documentation's promises: the README's examples are real, and every relative link resolves."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _blocks(text: str) -> list[str]:
    return FENCE.findall(text)


def _section(text: str, heading: str) -> str:
    """The text under the ``## heading`` line, up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(heading)}[^\n]*\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README has no '## {heading}' section"
    return match.group(1)


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 200


def test_readme_check_example_is_real_output(tmp_path, capsys):
    from surgeon.cli import main

    blocks = _blocks(_section(README.read_text(), "A diagnostic"))
    rules = next(b for b in blocks if b.startswith("# rules.surgery\n"))
    shown = next(b for b in blocks if b.startswith("$ surgeon check rules.surgery\n"))
    expected = shown.split("\n", 1)[1]
    path = tmp_path / "rules.surgery"
    path.write_text(rules)
    capsys.readouterr()
    code = main(["check", str(path)])
    captured = capsys.readouterr()
    printed = (captured.out + captured.err).replace(str(path), "rules.surgery")
    assert code == 1
    assert printed == expected


def test_readme_quickstart_runs(tmp_path, monkeypatch):
    blocks = [b for b in _blocks(_section(README.read_text(), "Quickstart")) if "surgeon.compile" in b]
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md (quickstart)", "exec"), {"__name__": "readme_quickstart"})
    assert (tmp_path / "runs" / "quickstart" / "adapter" / "adapter_config.json").is_file()


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation removed, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link's text only
    text = text.lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#* *$", text, re.M):
        slug = _slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    return LINK.findall(text)


def test_slug_rules():
    assert _slug("Performance (against PEFT, same model, same run)") == "performance-against-peft-same-model-same-run"
    assert _slug("Programs (`.pt2`)") == "programs-pt2"
    assert _slug("`kbit_training`") == "kbit_training"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert page.is_file(), page
    broken = []
    for target in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (page.parent / file_part).resolve() if file_part else page
        if not resolved.exists():
            broken.append(f"{target}: no file {resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading '#{anchor}' in {resolved.relative_to(ROOT)}")
    assert not broken, broken


@pytest.mark.parametrize("page", PAGES[1:], ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_open_with_a_title_and_a_summary_paragraph(page):
    lines = page.read_text().splitlines()
    assert lines[0].startswith("# "), lines[0]
    body = [line for line in lines[1:] if line.strip()]
    first = body[0]
    assert not first.startswith(("#", "|", "-", "```", ">")), f"{page.name} opens with {first!r}, not a paragraph"
