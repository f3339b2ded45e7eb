"""The systemd units shipped in the package (issue 14, item 2), as ``hsmfs units`` installs
them, checked by the real ``systemd-analyze verify``; their command line is hsmfs's own."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hsmfs.__main__ import _parser
from hsmfs.config import build_options, split_options

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None,
                                   reason="systemd-analyze not installed (apt-get install systemd)")
INSTANCE = "hsmfs-serve@srv-data.service"  # the kernel door on /srv/data


def _install(tmp_path: Path) -> Path:
    out = subprocess.run([sys.executable, "-m", "hsmfs", "units", "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert sorted(Path(p).name for p in out.stdout.split()) == [
        "hsmfs-serve@.service", "mnt-data.mount"]
    # systemd reads an instance through a link named after it, as `systemctl enable` makes.
    (tmp_path / INSTANCE).symlink_to("hsmfs-serve@.service")
    return tmp_path


def _verify(*units: Path) -> subprocess.CompletedProcess:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, "verify", "--man=no", *map(str, units)],
                          capture_output=True, text=True, timeout=60)


@needs_analyze
def test_units_verify(tmp_path: Path) -> None:
    d = _install(tmp_path)
    out = _verify(d / INSTANCE, d / "mnt-data.mount")
    # Warnings (an unknown or ignored setting) do not change the exit status: none may name
    # our units.  Lines about the host's own units are not ours to judge.
    ours = [line for line in out.stderr.splitlines()
            if str(d) in line or "hsmfs" in line or "mnt-data" in line]
    assert out.returncode == 0 and not ours, out.stderr


@needs_analyze
def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above is worth something: a unit whose command does not exist fails it."""
    d = _install(tmp_path)
    text = (d / "hsmfs-serve@.service").read_text()
    (d / "broken@.service").write_text(text.replace(sys.executable, "/nonexistent/python3"))
    (d / "broken@srv-data.service").symlink_to("broken@.service")
    assert _verify(d / "broken@srv-data.service").returncode != 0


def test_serve_unit_runs_hsmfs_serve_in_the_foreground(tmp_path: Path) -> None:
    """ExecStart, with the environment file's variables and %f filled in as systemd would,
    is a command line hsmfs accepts: serve, in the foreground (Type=notify), on /srv/data."""
    d = _install(tmp_path)
    text = (d / "hsmfs-serve@.service").read_text()
    [line] = re.findall(r"^ExecStart=(.*)$", text, re.M)
    line = (line.replace("${HSMFS_SOURCE}", "s3://bucket/prefix")
            .replace("${HSMFS_OPTIONS}", "endpoint=http://127.0.0.1:9000,open_fill=8M")
            .replace("%f", "/srv/data"))
    argv = shlex.split(line)
    assert argv[:3] == [sys.executable, "-m", "hsmfs"] and os.access(argv[0], os.X_OK)
    args = _parser().parse_args(argv[3:])
    assert (args.cmd, args.source, args.dir, args.foreground) == (
        "serve", "s3://bucket/prefix", "/srv/data", True)
    opts = build_options(args.source, split_options(args.o), mountpoint=None,
                         cache_dir=args.dir, kernel_door=True)
    assert opts.kernel is not None and opts.s3.endpoint_url == "http://127.0.0.1:9000"
    assert "Type=notify" in text and "KillMode=mixed" in text
