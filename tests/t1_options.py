"""The ``-o`` option table (issue 14, item 4): one definition (``hsmfs.config.OPTIONS``) that
parses, that ``--help`` prints and that the README's table is generated from; these tests fail
when any of the three drifts.  The options' effect on a real mount is in t4_mount_options.py."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
from conftest import ROOT

from hsmfs import __version__
from hsmfs.config import (
    OPTIONS,
    CacheConfig,
    FuseConfig,
    KernelConfig,
    S3Config,
    build_options,
    split_options,
)

LAYERS = {"s3": S3Config, "cache": CacheConfig, "kernel": KernelConfig, "fuse": FuseConfig}


def _hsmfs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hsmfs", *args], capture_output=True,
                          text=True, timeout=30, cwd=ROOT)


def test_readme_table_is_generated_from_the_option_table() -> None:
    out = subprocess.run([sys.executable, "scripts/options_table.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("spec", [o for o in OPTIONS if o.literal_default and o.layer in LAYERS],
                         ids=lambda o: o.name)
def test_documented_default_is_the_configs_default(spec) -> None:
    """The default the table shows, parsed as a user would type it, is the dataclass's."""
    [f] = [f for f in dataclasses.fields(LAYERS[spec.layer]) if f.name == spec.field]
    assert spec.parse(spec.default) == f.default


@pytest.mark.parametrize("command", ["mount", "serve"])
def test_help_lists_every_option_with_default_and_meaning(command: str) -> None:
    out = _hsmfs(command, "--help")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # the meanings are wrapped
    for o in OPTIONS:
        listed = o.door != "fuse" or command == "mount"
        line = re.search(rf"^  {re.escape(o.usage)} +default: (.*)$", out.stdout, re.M)
        assert bool(line) == listed, o.name
        if listed:
            assert line[1] == o.default and o.meaning in text, o.name


def test_version() -> None:
    out = _hsmfs("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"hsmfs {__version__}"


def test_unknown_and_misplaced_options_name_themselves(tmp_path) -> None:
    out = _hsmfs("mount", "s3://b", str(tmp_path), "-o", f"cache={tmp_path},nodev,frobnicate=3")
    assert out.returncode == 2 and "unknown option 'frobnicate'" in out.stderr
    out = _hsmfs("serve", "s3://b", str(tmp_path), "-o", "uid=1000")
    assert out.returncode == 2 and "'uid' is for the FUSE door" in out.stderr
    out = _hsmfs("mount", "s3://b", str(tmp_path), "-o", f"cache={tmp_path},umask=999")
    assert out.returncode == 2 and "umask=999" in out.stderr


def _fuse(opts: str) -> FuseConfig:
    cfg = build_options("s3://b", split_options([opts]), mountpoint="/mnt", cache_dir="/c",
                        kernel_door=False).fuse
    assert cfg is not None
    return cfg


def test_fuse_options_parse() -> None:
    assert _fuse("ro").read_only and not _fuse("ro,rw").read_only
    assert _fuse("rw,ro,rw,ro").read_only  # the later one wins, however often repeated
    cfg = _fuse("uid=1000,gid=100,umask=027,allow_other,default_permissions")
    assert (cfg.uid, cfg.gid, cfg.umask, cfg.allow_other) == (1000, 100, 0o027, True)
    assert (_fuse("").uid, _fuse("").gid, _fuse("").umask) == (None, None, 0)
    with pytest.raises(ValueError, match="uid=-1"):
        _fuse("uid=-1")
