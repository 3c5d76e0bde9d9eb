"""Content-addressed blob store: ``ROOT/ab/cdef….png`` for sha256 ``abcdef…``."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, sha256: str, suffix: str = ".png") -> Path:
        if not _SHA256.match(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / f"{sha256[2:]}{suffix}"

    def exists(self, sha256: str, suffix: str = ".png") -> bool:
        return self.path(sha256, suffix).is_file()

    def put(self, sha256: str, data: bytes, suffix: str = ".png") -> Path:
        """Write atomically (temp file + rename); a blob already present is left as it is."""
        target = self.path(sha256, suffix)
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def get(self, sha256: str, suffix: str = ".png") -> bytes:
        return self.path(sha256, suffix).read_bytes()

    def put_file(self, relative: str, data: bytes) -> Path:
        """Store a non-image artifact (e.g. a model) under ROOT/relative, atomically."""
        target = (self.root / relative).resolve()
        if self.root.resolve() not in target.parents:
            raise ValueError(f"artifact path escapes the blob store: {relative!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
        return target

    def reachable(self) -> bool:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".health"
            probe.write_bytes(b"ok")
            probe.unlink()
            return True
        except OSError:
            return False
