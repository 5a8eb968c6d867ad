"""Write a generated section into a Markdown page between ``<!-- <name>:start -->`` and
``<!-- <name>:end -->`` markers, leaving the rest of the page (the prose around it) untouched."""

from __future__ import annotations

import json
import re
from pathlib import Path

#: a generated section's opening marker; the name is what ``replace_section`` takes
START = re.compile(r"<!-- ([A-Za-z0-9_.-]+):start -->")


def markers(text: str) -> list[str]:
    """The names of the generated sections of a page, in page order."""
    return START.findall(text)


def section(text: str, name: str) -> str:
    """The text between a section's markers (without them), as ``replace_section`` wrote it."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise KeyError(name)
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def replace_section(page: Path, name: str, text: str, create: bool = True) -> None:
    """Replace the marked section ``name`` of ``page`` with ``text``; append it if the page lacks it,
    or, with ``create=False``, stop with an error (a page whose owner places the markers)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.strip()}\n{end}"
    page = Path(page)
    current = page.read_text() if page.is_file() else ""
    if start in current and end in current:
        head, rest = current.split(start, 1)
        tail = rest.split(end, 1)[1]
        new = head + block + tail
    elif not create:
        raise SystemExit(f"error: {page}: no '{start}' ... '{end}' markers to write the {name} section between")
    else:
        new = current.rstrip() + ("\n\n" if current.strip() else "") + block + "\n"
    tmp = page.with_suffix(page.suffix + ".tmp")
    page.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(new)
    tmp.replace(page)


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` whole or not at all (a run JSON that exists is a finished run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
