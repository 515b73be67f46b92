"""The README is a front door (at most ~300 lines) and every relative link in it and in docs/ resolves:
the file exists and, for ``#anchor`` links, a heading with that GitHub-style slug does."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    text = re.sub(r"<[^>]+>", "", heading)
    text = re.sub(r"[`*_\[\]]", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, seen, fence = set(), {}, False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        match = None if fence else re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(2))
            n = seen.get(base, 0)
            found.add(base if n == 0 else f"{base}-{n}")
            seen[base] = n + 1
    return found


def broken_links(files: list[Path]) -> list[str]:
    bad = []
    for f in files:
        text = re.sub(r"```.*?```", "", f.read_text(encoding="utf-8"), flags=re.S)
        text = re.sub(r"`[^`\n]*`", "", text)
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+://|^mailto:", target):
                continue
            path, _, frag = target.partition("#")
            dest = (f.parent / path).resolve() if path else f
            if not dest.exists():
                bad.append(f"{f.name}: missing file {target}")
            elif frag and (dest.suffix != ".md" or frag not in anchors(dest)):
                bad.append(f"{f.name}: missing anchor {target}")
    return bad


def test_readme_is_short_and_every_link_resolves():
    readme = ROOT / "README.md"
    assert len(readme.read_text(encoding="utf-8").splitlines()) <= 300
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert {p.stem for p in pages} >= {"algorithms", "rewards-and-evaluation", "orchestration", "reliability",
                                        "performance", "summarisation", "tracking"}
    assert broken_links([readme, *pages]) == []


def test_the_link_check_finds_a_broken_link(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n[ok](#title) [gone](b.md) [no anchor](#nope)\n")
    assert broken_links([tmp_path / "a.md"]) == ["a.md: missing file b.md", "a.md: missing anchor #nope"]


def test_no_internal_issue_numbers_in_the_docs():
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"\bissue\s+#?\d+|\bthis wave\b", text, flags=re.I), path.name
