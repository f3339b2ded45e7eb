"""Hostile answers beyond keys (issue 13, item 5): metadata and responses that lie.

Through each door, on each GET path (``lean_get=1``: signed urllib3 GETs; ``lean_get=0``:
boto3's client), the fault proxy rewrites S3's answers: a listing whose size is not the
object's, a Content-Range that is not the range asked for, a 200 (the whole object) to a
ranged GET, an ETag on the GET that is not the listed one.  Each read gets EIO with exactly one
log line naming the key, and never a wrong byte.  Metadata that lies (an ``x-amz-meta-mode``
that is not a number, or asks for setuid/setgid/sticky) never makes a set-id file: the bits
are dropped (or the mode ignored) with one warning, and the bytes, which are S3's, read right.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Bucket, seeded
from support.doors import DOORS, Served, serve_door

from hsmfs.faultproxy import Answer, FaultProxy

pytestmark = [pytest.mark.timeout(120), pytest.mark.parametrize("door", DOORS)]

SIZE = 1 << 20
# Ranged reads (not whole files), so that a 200 with the whole object is the wrong bytes.
RANGED = ("chunk=64K", "small_file=0", "max_request=256K", "readahead=256K", "open_fill=off",
          "dir_readahead=off", "retries=1", "timeout=5")
LIES = ("listing_bigger", "listing_smaller", "content_range", "status_200", "etag")
FOREVER = 1000

_PREAD = ("import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
          "sys.stdout.buffer.write(os.pread(fd, 4096, int(sys.argv[2])))")


def _header(headers: list[tuple[str, str]], name: str, value: str | None) -> list[tuple[str, str]]:
    """``headers`` with ``name`` set to ``value`` (removed when None)."""
    out = [(k, v) for k, v in headers if k.lower() != name.lower()]
    return out if value is None else [*out, (name, value)]


def _lie_listing(deltas: dict[str, int]) -> Callable[[Answer], Answer]:
    """A ListObjectsV2 page whose <Size> of each key is off by its delta (one rule: the
    proxy applies one rule per request)."""
    def rewrite(answer: Answer) -> Answer:
        status, headers, body = answer
        for key, delta in deltas.items():
            pattern = re.compile(rb"(<Key>" + re.escape(key.encode())
                                 + rb"</Key>.*?<Size>)(\d+)", re.S)
            body = pattern.sub(lambda m, d=delta: m[1] + str(int(m[2]) + d).encode(), body,
                               count=1)
        return status, headers, body
    return rewrite


def _shifted_range(data: bytes) -> Callable[[Answer], Answer]:
    """A server answering another range than the one asked for (4 KiB further on): as many
    bytes as asked, and a Content-Range that says which they are."""
    def rewrite(answer: Answer) -> Answer:
        status, headers, _body = answer
        value = dict((k.lower(), v) for k, v in headers).get("content-range", "")
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", value)
        assert m, value
        a, b, total = (int(x) for x in m.groups())
        return (status, _header(headers, "Content-Range", f"bytes {a + 4096}-{b + 4096}/{total}"),
                data[a + 4096:b + 4097])
    return rewrite


def _whole_object(data: bytes) -> Callable[[Answer], Answer]:
    """A server that ignored Range: 200 and the whole object."""
    def rewrite(answer: Answer) -> Answer:
        _status, headers, _body = answer
        return 200, _header(headers, "Content-Range", None), data
    return rewrite


def _other_etag(answer: Answer) -> Answer:
    status, headers, body = answer
    return status, _header(headers, "ETag", '"0123456789abcdef0123456789abcdef"'), body


def _loud(d: Served, key: str) -> list[str]:
    return [line for line in d.log().splitlines()
            if f"'{key}'" in line and (" WARNING " in line or " ERROR " in line)]


def _pread(path: Path, offset: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _PREAD, str(path), str(offset)],
                          capture_output=True, timeout=30)


@pytest.mark.parametrize("lean", ["1", "0"], ids=["lean_get", "boto3_get"])
def test_lying_answers_give_eio_and_one_line(door: str, lean: str, bucket: Bucket,
                                             fault_proxy: FaultProxy, tmp_path: Path) -> None:
    data = {lie: bucket.put(f"lies/{lie}.bin", seeded(SIZE, lie)) for lie in LIES}
    honest = bucket.put("lies/honest.bin", seeded(SIZE, "honest"))
    # The listing lies from the start (the daemon lists once, before it is ready).
    fault_proxy.rewrite_next(FOREVER, _lie_listing({"lies/listing_bigger.bin": 4096,
                                                    "lies/listing_smaller.bin": -4096}),
                             match="list-type=2")
    with serve_door(door, f"s3://{bucket.name}", tmp_path, fault_proxy.endpoint, *RANGED,
                    f"lean_get={lean}") as d:
        fault_proxy.restore()  # the listing is done; now the GETs lie
        fault_proxy.rewrite_next(FOREVER, _shifted_range(data["content_range"]),
                                 match="/lies/content_range.bin")
        fault_proxy.rewrite_next(FOREVER, _whole_object(data["status_200"]),
                                 match="/lies/status_200.bin")
        fault_proxy.rewrite_next(FOREVER, _other_etag, match="/lies/etag.bin")
        for lie in LIES:
            key = f"lies/{lie}.bin"
            out = _pread(d.root / key, 3 * 65536 + 100)  # inside the object, past chunk 0
            assert out.returncode == 1 and b"[Errno 5] Input/output error" in out.stderr, \
                (lie, out.stdout[:64], out.stderr[-300:])
            assert out.stdout == b"", lie  # not one byte of a lie
            lines = _loud(d, key)
            assert len(lines) == 1, (lie, lines)
            assert re.search(r"ERROR .*fetch of '" + re.escape(key) + r"' \[\d+, \d+\) failed "
                             r"\((changed|bad_response), HTTP (200|206)\)", lines[0]), lines
        # Nothing of a lie was kept: the honest file next to them reads right, and so does
        # each lying object once S3 answers truthfully (a stale one stays EIO: its listing
        # named a size S3 does not have; that is for hsmfs sync to mend).
        fault_proxy.restore()
        out = _pread(d.root / "lies/honest.bin", 5000)
        assert out.returncode == 0 and out.stdout == honest[5000:9096]
        out = _pread(d.root / "lies/content_range.bin", 3 * 65536 + 100)
        assert out.stdout == data["content_range"][3 * 65536 + 100:][:4096], out.stderr
        errors = d.stats()["errors"]
        assert errors.get("bad_response") and errors.get("changed"), errors


def test_metadata_modes_never_make_a_setid_file(door: str, bucket: Bucket,
                                                fault_proxy: FaultProxy,
                                                tmp_path: Path) -> None:
    modes = {
        "setuid": (str(0o104755), 0o755),
        "setgid": (str(0o102755), 0o755),
        "sticky": (str(0o101644), 0o644),
        "all": (str(0o107777), 0o777),
        "words": ("rwxr-xr-x", 0o644),  # not a number: file_mode
        "negative": ("-1", 0o644),
        "huge": (str(1 << 40), 0o644),
        "directory": (str(0o040755), 0o644),  # not a regular file's mode
        "plain": (str(0o100750), 0o750),
    }
    for name, (raw, _want) in modes.items():
        bucket.client.put_object(Bucket=bucket.name, Key=f"m/{name}", Body=seeded(5000, name),
                                 Metadata={"mode": raw})
    with serve_door(door, f"s3://{bucket.name}", tmp_path, fault_proxy.endpoint) as d:
        for name, (_raw, want) in modes.items():
            path = d.root / "m" / name
            st = os.stat(path)
            assert stat.S_IMODE(st.st_mode) == want, (name, oct(st.st_mode))
            assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX), name
            out = subprocess.run(["cat", str(path)], capture_output=True, timeout=30)
            assert out.stdout == seeded(5000, name), name  # the bytes are S3's
            lines = _loud(d, f"m/{name}")
            assert len(lines) == (0 if name == "plain" else 1), (name, lines)
