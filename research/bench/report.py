"""Write a generated section into a Markdown page between ``<!-- <name>:start -->`` and
``<!-- <name>:end -->`` markers, leaving the rest of the page (the prose around it) untouched."""

from __future__ import annotations

from pathlib import Path


def replace_section(page: Path, name: str, text: str) -> None:
    """Replace the marked section ``name`` of ``page`` with ``text``; append it if the page lacks it."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.strip()}\n{end}"
    page = Path(page)
    current = page.read_text() if page.is_file() else ""
    if start in current and end in current:
        head, rest = current.split(start, 1)
        tail = rest.split(end, 1)[1]
        new = head + block + tail
    else:
        new = current.rstrip() + ("\n\n" if current.strip() else "") + block + "\n"
    tmp = page.with_suffix(page.suffix + ".tmp")
    page.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(new)
    tmp.replace(page)
