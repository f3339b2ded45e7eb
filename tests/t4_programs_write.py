"""Unaware programs that write, through both doors, then `hsmfs archive`, then S3 compared with
the local tree file by file (issue 11's test list): `git clone` + `git commit` into the tree,
and Python importing a package stored in S3 (it writes `__pycache__/*.pyc` by rename).

Real parts only: `hsmfs mount -f` / `hsmfs serve -f` subprocesses, a real moto S3 server, real
git and python as bounded subprocesses; every daemon stopped by PID.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Bucket, MotoServer
from support.doors import DOORS, serve_door

pytestmark = [pytest.mark.timeout(120)]


def run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{cmd}: {out.stdout}\n{out.stderr}"
    return out


def archive(path: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "hsmfs", "archive", str(path)],
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def local_files(root: Path, under: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, files in os.walk(root / under):
        for name in files:
            path = Path(dirpath) / name
            if not path.is_symlink():
                out[str(path.relative_to(root))] = path.read_bytes()
    return out


def s3_files(bucket: Bucket, prefix: str) -> dict[str, bytes]:
    client, out = bucket.client, {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket.name,
                                                                 Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = client.get_object(Bucket=bucket.name,
                                                Key=obj["Key"])["Body"].read()
    return out


@pytest.mark.parametrize("door", DOORS)
def test_git_clone_and_commit_into_the_tree_then_archive(
        door: str, bucket: Bucket, moto: MotoServer, tmp_path: Path) -> None:
    origin = tmp_path / "origin"
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid",
           "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path)}
    run(["git", "init", "-q", "-b", "main", str(origin)], env=env)
    (origin / "README").write_text("hello\n")
    run(["git", "add", "README"], cwd=origin, env=env)
    run(["git", "commit", "-q", "-m", "first"], cwd=origin, env=env)
    bucket.put("seed.txt", b"a bucket is never empty here\n")
    with serve_door(door, f"s3://{bucket.name}", tmp_path / "w", moto.endpoint) as d:
        repo = d.root / "repo"
        run(["git", "clone", "-q", str(origin), str(repo)], env=env)
        (repo / "notes.txt").write_text("written through the door\n")
        run(["git", "add", "notes.txt"], cwd=repo, env=env)
        run(["git", "commit", "-q", "-m", "second"], cwd=repo, env=env)
        archive(repo)
        local = local_files(d.root, "repo")
        assert s3_files(bucket, "repo/") == local
        assert "repo/notes.txt" in local
        log = run(["git", "log", "--oneline"], cwd=repo, env=env).stdout
        assert len(log.splitlines()) == 2


@pytest.mark.parametrize("door", DOORS)
def test_python_imports_a_package_from_s3_and_its_pycache_is_archived(
        door: str, bucket: Bucket, moto: MotoServer, tmp_path: Path) -> None:
    bucket.put("pkg/__init__.py", b"")
    bucket.put("pkg/mod.py", b"VALUE = 42\n")
    with serve_door(door, f"s3://{bucket.name}", tmp_path / "w", moto.endpoint) as d:
        env = {**os.environ, "PYTHONPATH": str(d.root)}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        out = run([sys.executable, "-c", "import pkg.mod; print(pkg.mod.VALUE)"], env=env)
        assert out.stdout.strip() == "42"
        cached = local_files(d.root, "pkg/__pycache__")
        assert cached, "python wrote no .pyc through the door"
        archive(d.root / "pkg")
        assert {k: v for k, v in s3_files(bucket, "pkg/").items() if "__pycache__" in k} \
            == cached
        # The .pyc are taken as valid by the next import: no rewrite (same bytes after).
        run([sys.executable, "-c", "import pkg.mod"], env=env)
        assert local_files(d.root, "pkg/__pycache__") == cached
