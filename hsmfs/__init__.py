"""hsmfs: hierarchical storage management for Linux — S3 objects as local files, filled on demand.

General layout (dependencies point down this list only; nothing imports a door):

* ``__main__`` — command line, ``-o`` options, daemonization; builds the config objects.
* ``daemon`` — one trio loop per process: populate the backing tree, run the doors.
* ``ops`` (FUSE door, pyfuse3) and ``kernel_bridge`` (fanotify pre-content door) — translations:
  a request in, ``StubCache.ensure(...)``, bytes or an errno out.
* ``cache`` — the backing tree, residency, the fetch engine (chunks, coalescing, read-ahead).
* ``backend_s3`` — the only boto3 user: list, head, ranged GET pinned to an ETag, retries.
* leaves: ``errors`` (the one errno table), ``config``, ``ranges``, ``keys``, ``control``.
"""

__version__ = "0.1.0"
