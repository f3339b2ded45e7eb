"""Write the README's fault matrix from ``tests/support/faultmatrix.py``.

    python3 scripts/fault_matrix.py          rewrite README.md between the markers
    python3 scripts/fault_matrix.py --check  exit 1 if README.md differs (tests/t4_faults.py)

The table lives between ``<!-- faults:begin -->`` and ``<!-- faults:end -->``; edit the
table in tests/support/faultmatrix.py (the one tests/t4_faults.py asserts), never the
README's copy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support.faultmatrix import matrix_markdown  # noqa: E402

BEGIN, END = "<!-- faults:begin -->", "<!-- faults:end -->"


def render(readme: str) -> str:
    """``readme`` with the block between the markers replaced by the generated table."""
    head, sep, rest = readme.partition(BEGIN)
    if not sep or END not in rest:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block")
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{matrix_markdown()}\n{END}{tail}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    p.add_argument("--readme", type=Path, default=REPO / "README.md")
    args = p.parse_args()
    text = args.readme.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print(f"{args.readme}: the fault matrix differs from tests/support/faultmatrix.py;"
                  " run python3 scripts/fault_matrix.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        args.readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
