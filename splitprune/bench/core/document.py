"""Keep BENCHMARKS.md's tables equal to the suites' generated markdown.

Between `<!-- include: PATH -->` and `<!-- end include -->` the file gets PATH's current content
(PATH relative to the document), so the prose around a table is written by hand and the numbers in the
table always come from the last run of its suite:

    python -m splitprune.bench.core.document BENCHMARKS.md
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

INCLUDE = re.compile(r"(<!-- include: (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- end include -->)", re.DOTALL)


def update(document: Path) -> list[str]:
    """Refresh every include block in place; returns the included paths."""
    text = document.read_text()
    included = []

    def fill(match: re.Match) -> str:
        source = document.parent / match["path"]
        if not source.exists():
            raise SystemExit(f"{document}: included file {source} does not exist (run its suite first)")
        included.append(match["path"])
        return f"{match[1]}{source.read_text().rstrip()}\n{match[4]}"

    document.write_text(INCLUDE.sub(fill, text))
    return included


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m splitprune.bench.core.document BENCHMARKS.md", file=sys.stderr)
        return 2
    if not Path(args[0]).is_file():
        print(f"{args[0]} is not a file", file=sys.stderr)
        return 2
    for path in update(Path(args[0])):
        print(f"included {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
