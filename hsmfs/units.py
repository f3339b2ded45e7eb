"""``hsmfs units``: write the systemd units shipped in ``hsmfs/systemd/`` where systemd reads
them, with ``@PYTHON@`` replaced by the interpreter that has hsmfs installed.

The interpreter, not a ``hsmfs`` script on PATH: systemd's PATH is fixed, and a pip install
into a venv or pyenv puts the script elsewhere.  Owns nothing else: the units themselves say
how they are used (comments at their top).
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import resources

#: Where systemd reads units an administrator installs.
UNIT_DIR = "/etc/systemd/system"
PLACEHOLDER = "@PYTHON@"


def shipped() -> dict[str, str]:
    """Every unit shipped in the package: {file name: text with the placeholder}."""
    root = resources.files("hsmfs") / "systemd"
    return {p.name: p.read_text() for p in sorted(root.iterdir(), key=lambda p: p.name)
            if p.name.endswith((".service", ".mount"))}


def render(python: str = sys.executable) -> dict[str, str]:
    """The shipped units, ready for systemd."""
    return {name: text.replace(PLACEHOLDER, python) for name, text in shipped().items()}


def units_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="hsmfs units", description="Install hsmfs's systemd units: hsmfs-serve@.service "
        "(the kernel door on a directory) and mnt-data.mount (an example FUSE mount unit).")
    p.add_argument("--dir", default=UNIT_DIR, help=f"where to write them (default {UNIT_DIR})")
    p.add_argument("--print", action="store_true", help="print them instead")
    args = p.parse_args(argv)
    units = render()
    if args.print:
        for name, text in units.items():
            print(f"# ---- {name}\n{text}")
        return 0
    os.makedirs(args.dir, exist_ok=True)
    for name, text in units.items():
        path = os.path.join(args.dir, name)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        print(path)
    if args.dir == UNIT_DIR:
        print("then: systemctl daemon-reload; see the comments at the top of each unit",
              file=sys.stderr)
    return 0
