"""Path safety: names that become folders must be plain file-name tokens, and nothing is written or deleted
outside the results folder (``--out``) and the cache (``$FCL_BENCH_CACHE``)."""

from __future__ import annotations

import os
import re
from pathlib import Path

# letters, digits, _ . + -, starting with a letter, digit or _: no separators, no ".." or ".", no "-x" options
_TOKEN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")


class PathError(ValueError):
    """An unsafe name or path; the message names it and the fix."""


def check_token(value: object, what: str) -> str:
    """``value`` if it is a plain file-name token (it becomes a folder name), else :class:`PathError`."""
    if not isinstance(value, str) or not _TOKEN.match(value) or len(value) > 128:
        raise PathError(f"{what} {value!r} is not a plain name: use letters, digits and _ . + - only "
                        "(starting with a letter, digit or _, at most 128 characters)")
    return value


def check_inside(path: Path, root: Path, what: str = "path") -> Path:
    """``path`` resolved, if it lies inside ``root`` (resolved), else :class:`PathError`."""
    p, r = Path(path).resolve(), Path(root).resolve()
    if p != r and r not in p.parents:
        raise PathError(f"{what} {p} is outside {r}; refusing to write or delete there")
    return p


def check_writable_dir(path: str | Path, what: str) -> Path:
    """``path`` is (or can become) a writable folder: the nearest existing ancestor is a writable folder
    and nothing on the way is a file. Nothing is created."""
    if str(path).strip() == "":
        raise PathError(f"{what} is empty; give a folder, e.g. {what} results")
    p = Path(path).expanduser()
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise PathError(f"{what} {p}: {probe} is a file, not a folder; choose another {what}")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise PathError(f"{what} {p}: {probe} is not writable; choose another {what}")
    return p


def click_path(**kwargs):
    """A ``click.Path`` whose file-system errors (a name too long, a loop of links) are usage errors."""
    import click

    class _SafePath(click.Path):
        def convert(self, value, param, ctx):
            try:
                return super().convert(value, param, ctx)
            except OSError as e:
                self.fail(f"{value!r}: {e.strerror or e}", param, ctx)

    return _SafePath(**kwargs)
