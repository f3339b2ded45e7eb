"""hsmfs: hierarchical storage management for Linux — S3 objects as local files, filled on demand.

General layout (dependencies point down this list only; nothing imports a door):

* ``__main__`` — command line, ``-o`` options, daemonization; builds the config objects.
* ``holder`` — process H of the kernel door: owns the fanotify group (no trio, no boto3);
  ``cover`` — what the cache dir shows while nothing guards it.
* ``daemon``, ``worker`` — one trio loop per process: populate the backing tree, run the doors.
* ``ops`` (FUSE door, pyfuse3) and ``kernel_bridge`` (fanotify pre-content door, with
  ``holder_link``, its end of H) — translations: a request in, ``StubCache.lookup(fd)`` and
  ``StubCache.ensure(stub, start, stop, intent)``, bytes or an errno out.
* ``cache`` — the façade and the state machine, over ``registry`` (the index of stubs,
  staging), ``fetch`` (flights, coalescing), ``readahead`` (the access pattern), ``state``
  (one file's state, pins, intents) and ``stubfile`` (the on-disk record, extents).
* ``backend_s3`` — the only boto3 user: list, head, ranged GET pinned to an ETag, retries.
* leaves: ``errors`` (the one errno table), ``config``, ``ranges``, ``keys``, ``control``,
  ``fanotify`` (ABI), ``mounts`` (the one mountinfo reader), ``logsetup``.
"""

__version__ = "0.1.0"
