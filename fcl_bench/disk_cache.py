"""What every on-disk cache of the suite shares: a lock for first use, a check on load, a one-line message.

The caches under ``$FCL_BENCH_CACHE`` (the synthetic dataset, the pretrained tiny ViT) follow one pattern,
:func:`load_or_build`:

1. read the cache without a lock (files are only ever replaced atomically, so a reader sees a whole old
   file or a whole new one); a cache that reads and passes its checks is used;
2. otherwise take an exclusive ``flock`` on ``<cache file>.lock`` next to it and read again: another
   process may have written it while this one waited;
3. still missing: build it and write it (atomically) while holding the lock. Damaged: say so in one line on
   stderr (``... is damaged (sha256 mismatch); pretraining again``) and build it again.

So two processes that start on an empty cache build it once: the second waits for the first and loads what
it wrote. The kernel releases a ``flock`` when its process dies, so a killed builder leaves no stale lock.
Lock files stay in place (removing one would let a waiter and a newcomer lock different files).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

try:
    import fcntl
except ImportError:  # not POSIX: no locking (concurrent first use is then unsafe)
    fcntl = None

T = TypeVar("T")


class DamagedCache(Exception):
    """A cache file exists but fails its checks; the message says what is wrong (``sha256 mismatch``)."""


def say(line: str) -> None:
    """One line on stderr, flushed: cache messages must reach a log even when stdout is redirected."""
    print(line, file=sys.stderr, flush=True)


def first_line(error: BaseException, limit: int = 120) -> str:
    """``error``'s type and the first line of its message, at most ``limit`` characters."""
    text = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


@contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<path>.lock`` (created next to ``path``) inside the block."""
    path = Path(path)
    if fcntl is None:
        yield
        return
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another process that is writing {path}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def load_or_build(path: Path, read: Callable[[], T], build: Callable[[], T], what: str, redo: str,
                  force: bool = False) -> T:
    """``read()`` the cache at ``path``, or ``build()`` it (which writes it) under :func:`cache_lock`.

    ``read`` raises ``FileNotFoundError`` when there is no cache and :class:`DamagedCache` when it fails its
    checks; ``build`` writes the cache atomically and returns what ``read`` would. A damaged cache is
    reported as ``{what} at {path} is damaged ({reason}); {redo}``. ``force`` builds without reading.
    """
    if not force:
        try:
            return read()
        except (FileNotFoundError, DamagedCache):
            pass  # read again under the lock, which reports the damage once it is sure
    with cache_lock(path):
        if not force:
            try:
                return read()
            except FileNotFoundError:
                pass
            except DamagedCache as damage:
                say(f"{what} at {path} is damaged ({damage}); {redo}")
        return build()
