"""Atomic file writes: a killed run leaves the old file or none, never half of one. Writes that the machine
refuses (disk full, read-only folder, file size limit) become one-line ``WriteError``s naming the path."""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from featcache.errors import WriteError

REFUSED = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS}


@contextmanager
def write_errors(path: str | Path) -> Iterator[None]:
    """Turn an OSError that means "this machine will not let you write here" into a ``WriteError`` naming
    ``path`` (and the file the system named); other errors pass unchanged."""
    try:
        yield
    except OSError as err:
        if err.errno not in REFUSED:
            raise
        where = f" ({err.filename})" if err.filename and str(err.filename) != str(path) else ""
        raise WriteError(f"{path}: cannot write, {os.strerror(err.errno).lower()}{where}; fix it and rerun "
                         "(what was already written is kept)") from None


def atomic_write(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``. The temporary file is
    created with the default mode (umask applies, unlike ``mkstemp``'s owner-only 0600)."""
    path = Path(path)
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with tmp.open("xb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path
