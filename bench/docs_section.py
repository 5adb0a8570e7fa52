"""Replace (or append) one benchmark's marked section of docs/benchmarks.md."""
from pathlib import Path


def update_section(path: Path, head: str, begin: str, end: str, block: str) -> None:
    """``block`` must start with ``begin`` and end with ``end``; the old block between the
    markers is replaced, or ``head`` and the block are appended."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        a, b = text.index(begin), text.index(end) + len(end)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip("\n") + f"\n\n{head}\n\n{block}\n"
    path.write_text(text)
