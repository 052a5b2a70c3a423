"""Rebuild edge_llm/data/calibration.txt, the default text of `edge-llm imatrix`, from public-domain
texts in Debian packages (edge_llm/data/SOURCES.md says which and why).

    apt-get download dict-devil dict-jargon dict-elements libsqlite3-dev sword-text-sparv
    for f in *.deb; do dpkg-deb -x "$f" root; done
    pip install pysword   # reads the SWORD Bible module; only this script needs it
    python scripts/make_calibration_text.py root > edge_llm/data/calibration.txt

The kinds of text are interleaved in blocks of about 2 KB, so that the first chunks already hold
every kind: `edge-llm imatrix --chunks 10` still sees prose, code, data and Spanish.
"""

from __future__ import annotations

import gzip
import re
import sys
from itertools import zip_longest
from pathlib import Path

BLOCK = 2048


def dictd_body(path: Path, first_entry: str, size: int) -> str:
    """A dictd database's text from the line `first_entry` on, `size` characters cut at a blank line."""
    text = gzip.decompress(path.read_bytes()).decode("utf-8")
    start = re.search(rf"^{re.escape(first_entry)}$", text, flags=re.MULTILINE).start()
    return cut(text[start:], size)


def cut(text: str, size: int) -> str:
    end = text.rfind("\n\n", 0, size)
    return text[: end if end > 0 else size].strip() + "\n"


def devil(root: Path) -> str:
    text = gzip.decompress((root / "usr/share/dictd/devil.dict.dz").read_bytes()).decode("utf-8")
    start = text.index("                              PREFACE")
    return cut(text[start:], 46_000)


def luke(root: Path) -> str:
    from pysword.modules import SwordModules

    modules = SwordModules(str(root / "usr/share/sword"))
    modules.parse_modules()
    bible = modules.get_bible_from_module("spaRV1909eb")
    chapters = []
    for chapter in range(1, 7):
        verses = bible.get(books=["luke"], chapters=[chapter], clean=True, join="\n").split("\n")
        chapters.append("\n".join(" ".join(v.strip() for v in verses[i:i + 5]) for i in range(0, len(verses), 5)))
    return "\n\n".join(chapters) + "\n"


def sources(root: Path) -> list[str]:
    sqlite = (root / "usr/include/sqlite3.h").read_text(encoding="utf-8")
    elements = gzip.decompress((root / "usr/share/dictd/elements.dict.dz").read_bytes()).decode("latin-1")
    elements = elements[elements.index("\nhydrogen\n") + 1: elements.index("\nneptunium\n")]
    return [devil(root), dictd_body(root / "usr/share/dictd/jargon.dict.dz", "hack", 46_000),
            cut(sqlite, 40_000), elements.strip() + "\n", luke(root)]


def blocks(text: str) -> list[str]:
    out, current = [], ""
    for para in text.split("\n\n"):
        current = f"{current}\n\n{para}" if current else para
        if len(current) >= BLOCK:
            out.append(current)
            current = ""
    if current:
        out.append(current)
    return out


def main() -> None:
    root = Path(sys.argv[1])
    parts = [blocks(s) for s in sources(root)]
    interleaved = [b for group in zip_longest(*parts) for b in group if b]
    sys.stdout.write("\n\n".join(interleaved).strip() + "\n")


if __name__ == "__main__":
    main()
