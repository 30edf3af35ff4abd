"""Every Markdown file the repository cites exists, and every cited section is a heading of that file.

Scans the .py and .md files of the repository (not .git, hidden folders, build output or tests/data) for
mentions of ``*.md`` files (``docs/ARCHITECTURE.md``, ``detris_code.md``, ``README.md``, ...). A mention with a
folder is resolved against the repository root, then against the citing file's folder; a bare name against the
citing file's folder, the root and docs/. Names must match exactly, case included (``docs/architecture.md`` is
not ``docs/ARCHITECTURE.md``). A mention followed by a quoted section (``docs/detris_code.md "Decoder"`` or
``docs/detris_code.md ("Decoder", ...)``) must name the start of one of that file's Markdown headings.
"""

from __future__ import annotations

import functools
import os
import re

from helpers import ROOT

SKIP_DIRS = {"__pycache__", "build", "dist", "runs", "workdir", "node_modules"}
SKIP_PATHS = {"tests/data"}
SELF = os.path.relpath(os.path.abspath(__file__), ROOT).replace(os.sep, "/")

URL = re.compile(r"\w+://\S+")
MD = "." + "md"  # spelt in two pieces so this file does not cite anything itself
MENTION = re.compile(r"(?<![\w/.-])((?:\.{1,2}/)*(?:[\w.-]+/)*[\w-][\w.-]*" + re.escape(MD) + r")(?![\w-])")
SECTION = re.compile(r"(?:\s+\(?|\s*\()[\"\u201c]([A-Z][^\"\u201d\n]*)[\"\u201d]")


def _repo_files() -> tuple[list[str], frozenset[str]]:
    """(the .py and .md files to scan, every .md file) as '/'-separated paths relative to the root."""
    scan, markdown = [], set()
    for folder, dirs, files in os.walk(ROOT):
        rel = os.path.relpath(folder, ROOT).replace(os.sep, "/")
        rel = "" if rel == "." else rel + "/"
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith(".")
            and d not in SKIP_DIRS
            and not d.endswith(".egg-info")
            and rel + d not in SKIP_PATHS
        ]
        for name in files:
            if name.endswith(MD):
                markdown.add(rel + name)
            if name.endswith((".py", MD)) and rel + name != SELF:
                scan.append(rel + name)
    return sorted(scan), frozenset(markdown)


def _resolve(mention: str, citing: str, markdown: frozenset[str]) -> str | None:
    here = os.path.dirname(citing)
    bases = ("", here) if "/" in mention else (here, "", "docs")
    for base in bases:
        path = os.path.normpath(os.path.join(base, mention)).replace(os.sep, "/")
        if path in markdown:
            return path
    return None


@functools.cache
def _headings(path: str) -> tuple[str, ...]:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return tuple(line.lstrip("#").strip().lower() for line in f if line.startswith("#"))


@functools.cache
def _citations() -> tuple[tuple[str, int, str, str | None, str | None], ...]:
    """(citing file, line, mention, resolved path or None, quoted section or None) for every mention."""
    return tuple(_scan())


def _scan():
    scan, markdown = _repo_files()
    for citing in scan:
        with open(os.path.join(ROOT, citing), encoding="utf-8", errors="replace") as f:
            text = URL.sub(lambda m: " " * len(m.group()), f.read())
        for m in MENTION.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            section = SECTION.match(text, m.end())
            yield (
                citing,
                line,
                m.group(1),
                _resolve(m.group(1), citing, markdown),
                section.group(1) if section else None,
            )


def test_cited_markdown_files_exist():
    missing = [f"{c}:{n}: {mention}" for c, n, mention, path, _ in _citations() if path is None]
    assert not missing, "cited Markdown files that do not exist:\n" + "\n".join(missing)


def test_cited_sections_are_headings():
    bad = []
    for citing, line, mention, path, section in _citations():
        if path is None or section is None:
            continue
        if not any(h.startswith(section.lower()) for h in _headings(path)):
            bad.append(f'{citing}:{line}: {mention} "{section}"')
    assert not bad, "cited sections that are not headings of the cited file:\n" + "\n".join(bad)


def test_architecture_note_has_its_sections():
    headings = _headings("docs/ARCHITECTURE.md")
    for name in ("data flow", "adapter schema", "layout", "decisions where the papers are silent"):
        assert name in headings, name
