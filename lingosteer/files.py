"""Files written whole or not at all, and content hashes of files."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_HASH_BLOCK_BYTES = 1 << 20


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A fresh temporary path beside `path` to write to; when the block succeeds it replaces `path` in
    one rename (a reader sees the old file or the new one, never half of one), when it fails it is removed.

    `suffix` ends the temporary name, for writers that add or read one (`np.save` adds ".npy" to any
    other name, `savefig` infers the format). The name is unique per call, so concurrent writers of
    one path never write into each other's file; it is hidden, so directory listings skip it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through `atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_files(*paths: str | Path) -> str:
    """Hex sha256 of the files' contents, one after another, read in blocks (files may be large)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(_HASH_BLOCK_BYTES):
                digest.update(block)
    return digest.hexdigest()
