"""Write the README's ``-o`` option table from ``hsmfs.config.OPTIONS``.

    python3 scripts/options_table.py          rewrite README.md between the markers
    python3 scripts/options_table.py --check  exit 1 if README.md differs (tests/t1_options.py)

The table lives between ``<!-- options:begin -->`` and ``<!-- options:end -->``; edit the
option table in hsmfs/config.py, never the README's copy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hsmfs.config import options_markdown  # noqa: E402

BEGIN, END = "<!-- options:begin -->", "<!-- options:end -->"


def render(readme: str) -> str:
    """``readme`` with the block between the markers replaced by the generated table."""
    head, sep, rest = readme.partition(BEGIN)
    if not sep or END not in rest:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block")
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{options_markdown()}\n{END}{tail}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    p.add_argument("--readme", type=Path, default=REPO / "README.md")
    args = p.parse_args()
    text = args.readme.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print(f"{args.readme}: the option table differs from hsmfs/config.py OPTIONS; "
                  "run python3 scripts/options_table.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        args.readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
