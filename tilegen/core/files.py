"""Writing generated files: atomically, and only when their content changed (so that ninja rebuilds
only what changed, and readers never see half a file)."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

LIBRARY_COPY = "_include"  # a generated package's copy of the library headers its ops are built with


@dataclass
class FileManager:
    """Writes files atomically, and only when their content changed."""

    root: Path
    written: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)

    def write(self, rel: str | Path, content: str) -> Path:
        path = self.root / rel
        data = content.encode()
        if path.exists() and path.read_bytes() == data:
            self.unchanged.append(path)
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)  # readers see the old or the new file, never half of one
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self.written.append(path)
        return path


def write_files(files: dict[str, str], root: Path) -> FileManager:
    fm = FileManager(root)
    for rel, text in sorted(files.items()):
        fm.write(rel, text)
    return fm
