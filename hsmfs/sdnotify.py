"""The systemd notification protocol (sd_notify(3)): tell a ``Type=notify`` service manager
that hsmfs serves (``READY=1``), which for the kernel door means every stub is guarded.

A leaf: no trio, no boto3 (the kernel door's holder process calls it).  Does nothing without
``$NOTIFY_SOCKET``, and never fails the daemon: a manager that cannot be told is the
manager's problem, logged once.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(*fields: str) -> bool:
    """Send ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET``; False if there is none or it failed."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(1.0)  # a datagram to a local socket: never worth a hung start
            s.connect(address)
            s.sendall("\n".join(fields).encode())
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", address, exc)
        return False
    return True


def ready(status: str) -> bool:
    # One line: STATUS= ends at a newline.
    return notify("READY=1", "STATUS=" + status.replace("\n", " "))
