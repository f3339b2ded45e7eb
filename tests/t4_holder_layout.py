"""The holder process stays small (issue 10, item 5): it imports neither trio nor boto3, and
the door (kernel_bridge) imports nothing from the command line.

Each check runs in a fresh interpreter, so what the test process imported does not count.
The last one runs the holder's real path end to end (``hsmfs serve -f`` in-process, up to the
worker's failed start and the holder's exit) and looks at what that process imported.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("trio", "boto3", "botocore", "pyfuse3")


def _python(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.mark.parametrize("module", ["hsmfs.holder", "hsmfs.worker", "hsmfs.__main__",
                                    "hsmfs.mounts", "hsmfs.logsetup"])
def test_holder_side_imports_no_trio_or_boto3(module: str) -> None:
    out = _python(f"import {module}, sys; print([m for m in {HEAVY!r} if m in sys.modules])")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", (module, out.stdout)


def test_kernel_bridge_does_not_import_the_command_line() -> None:
    out = _python("import hsmfs.kernel_bridge, sys; print('hsmfs.__main__' in sys.modules)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    source = (REPO / "hsmfs" / "kernel_bridge.py").read_text()
    assert "__main__" not in source.split('"""', 2)[2]  # not even lazily


@pytest.mark.needs_precontent
def test_the_holders_whole_run_imports_no_trio_or_boto3(tmp_path: Path) -> None:
    """``hsmfs serve -f`` in this interpreter: the holder starts, its worker fails (nothing
    listens at the endpoint), the holder exits.  The worker imported trio and boto3 in its own
    process; the holder's must hold neither."""
    code = f"""
import sys
from hsmfs.__main__ import main
rc = main(["serve", "-f", "s3://b", {str(tmp_path / "cache")!r}, "-o",
           "endpoint=http://127.0.0.1:{free_port()}"])
print("rc", rc, [m for m in {HEAVY!r} if m in sys.modules])
"""
    out = _python(code, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "rc 1 []", (out.stdout, out.stderr)
    assert "worker pid" in out.stderr  # the holder really ran and started a worker
