"""One generated block of the README: the text between ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->`` is a table made from code (the option table, the fault matrix), written
by a script of its own and checked by a test, so the README cannot drift from the code."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def render(readme: str, name: str, table: str) -> str:
    """``readme`` with the block between NAME's markers replaced by ``table``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    head, sep, rest = readme.partition(begin)
    if not sep or end not in rest:
        raise SystemExit(f"README.md has no {begin} ... {end} block")
    _, _, tail = rest.partition(end)
    return f"{head}{begin}\n{table}\n{end}{tail}"


def main(name: str, make_table: Callable[[], str], what: str, script: str,
         description: str) -> int:
    """Rewrite the block, or with ``--check`` exit 1 if the README differs."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    p.add_argument("--readme", type=Path, default=REPO / "README.md")
    args = p.parse_args()
    text = args.readme.read_text()
    new = render(text, name, make_table())
    if args.check:
        if new != text:
            print(f"{args.readme}: {what}; run python3 {script}", file=sys.stderr)
            return 1
        return 0
    if new != text:
        args.readme.write_text(new)
    return 0
