"""Every citation of a docs section by name or number points at a section that exists.

Code and docs cite sections as ``docs/design.md, "Routing"`` or ``docs/design.md, section 4.3``
(docs/design.md's preamble). A heading renamed or renumbered in a merge silently orphans such
a citation; this reads every cited name and checks it against the cited file's headings (a
cited name may be a heading's prefix up to ``:`` or `` (``, or a bold run-in title such as
``**Signed bundles.**``).
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = (".py", ".md", ".toml", ".sh", ".yml", ".yaml")
SKIP_DIRS = {".venv", ".git", "runs", "node_modules", "__pycache__", ".mypy_cache", ".ruff_cache"}
# docs/x.md, "Name" | docs/x.md, \"Name\" | docs/x.md, section 4.3 (line breaks and comment marks
# between the parts are joined first)
CITATION = re.compile(
    r'((?:[\w.-]+/)*[\w.-]+\.md)`?,?[ \t]*(?:section\s+(\d+(?:\.\d+)*)|"([A-Za-z][^"\n]{0,60}?)"'
    r'|\\"([A-Za-z][^"\\]{0,60}?)\\")')


def anchors(doc: Path) -> set[str]:
    """The names and numbers a citation of ``doc`` may use."""
    text = doc.read_text(encoding="utf-8")
    names: set[str] = set()
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        m = re.match(r"^#+\s+(.*?)\s*$", line)
        if m and not in_code:
            title = m.group(1).strip("` ")
            names.add(title)
            num = re.match(r"^(\d+(?:\.\d+)*)\.?\s+(.*)$", title)
            if num:
                names.add(num.group(2))
                names.add("section " + num.group(1))
    names |= {m.group(1).strip() for m in re.finditer(r"\*\*([^*\n]+?)[.:]?\*\*", text)}
    return names


def cited_ok(key: str, names: set[str]) -> bool:
    return key in names or any(n.startswith(key + ":") or n.startswith(key + " (") for n in names)


def resolve(cited: str, source: Path) -> Path | None:
    """The doc a citation names: a repository path, else docs/<name>, else beside the source."""
    for cand in (ROOT / cited, ROOT / "docs" / cited, source.parent / cited):
        if cand.is_file():
            return cand
    return None


def test_every_cited_section_exists() -> None:
    broken: list[str] = []
    cache: dict[Path, set[str]] = {}
    for path in sorted(ROOT.rglob("*")):
        if path.suffix not in SCANNED or SKIP_DIRS & set(path.relative_to(ROOT).parts):
            continue
        if not path.is_file():
            continue
        flat = re.sub(r"\n\s*(?:#+\s*|//\s*|\*\s*)?", " ", path.read_text(encoding="utf-8",
                                                                       errors="replace"))
        for m in CITATION.finditer(flat):
            doc = resolve(m.group(1), path)
            if doc is None:
                continue
            key = m.group(3) or m.group(4) or ("section " + m.group(2) if m.group(2) else "")
            if not key:
                continue
            names = cache.setdefault(doc, anchors(doc))
            if not cited_ok(key, names):
                broken.append(f"{path.relative_to(ROOT)}: {m.group(1)}, {key!r}")
    assert not broken, "citations of missing sections:\n" + "\n".join(broken)
