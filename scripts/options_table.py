"""Write the README's ``-o`` option table from ``hsmfs.config.OPTIONS``.

    python3 scripts/options_table.py          rewrite README.md between the markers
    python3 scripts/options_table.py --check  exit 1 if README.md differs (tests/t1_options.py)

The table lives between ``<!-- options:begin -->`` and ``<!-- options:end -->``; edit the
option table in hsmfs/config.py, never the README's copy.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_block import REPO, main

sys.path.insert(0, str(REPO))
from hsmfs.config import options_markdown

if __name__ == "__main__":
    sys.exit(main("options", options_markdown,
                  "the option table differs from hsmfs/config.py OPTIONS",
                  "scripts/options_table.py", __doc__.split("\n")[0]))
