"""Fixtures shared by the backend, FUSE and kernel-door tests.

Import them into a test module or conftest (pytest resolves fixtures by name)::

    from support.fixtures import fault_proxy  # noqa: F401

``fault_proxy`` needs the session ``moto`` fixture of tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hsmfs.faultproxy import FaultProxy


@pytest.fixture
def fault_proxy(moto) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` in front of the moto server, listening; stopped after the test
    whatever happens.  Point clients at ``fault_proxy.endpoint``."""
    proxy = FaultProxy(moto.endpoint)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
