"""The one benchmarks page (docs/benchmarks.md): each benchmark writes its own part."""

from __future__ import annotations

from pathlib import Path


def write_generated(page: Path, name: str, text: str) -> None:
    """Put text between the page's `<!-- generated: NAME -->` and `<!-- end: NAME -->`
    markers, leaving what is written by hand around them; a page without the markers
    gets the part appended with them. One page holds every benchmark's tables."""
    begin, end = f"<!-- generated: {name} -->", f"<!-- end: {name} -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    current = page.read_text() if page.exists() else ""
    if begin in current and end in current:
        head, _, rest = current.partition(begin)
        _, _, tail = rest.partition(end)
        page.write_text(head + block + tail)
    else:
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(current.rstrip("\n") + ("\n\n" if current else "") + block + "\n")
