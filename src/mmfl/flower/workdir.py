"""The folder of one deployment, ``OUT/flower``: private, and mmfl removes only what it made.

Everything in it is created private (folders 0700, files 0600: :func:`private_files` sets the
umask 077 while files are written; processes are started with the same umask), never made
private afterwards. A manifest, ``OUT/flower/.mmfl-created``, lists the names (of
:data:`OWNED`) that mmfl created; :meth:`WorkDir.claim` refuses a name mmfl needs that exists
without being listed (a user's file) and removes only the listed ones, :meth:`WorkDir.clean`
likewise. Any other file in the folder is never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from mmfl.errors import ResultsError

#: Lists the names mmfl created in the folder.
MANIFEST = ".mmfl-created"
#: Every name mmfl may create in the folder (see mmfl.flower.local's module docstring).
OWNED = ("logs", "home", "superlink", "nodes", "shards", "app", "tls", "keys",
         "experiment.toml", "run-config.toml", "identity.json", "commands.sh",
         "deployment.json", "rejected.jsonl", "progress.jsonl")
#: Names kept after a completed run (plus ``logs`` when asked).
KEPT = ("deployment.json", "rejected.jsonl")
#: Kept when the folder is prepared again: the rejections of earlier attempts of the run.
RECORDS = ("rejected.jsonl",)
#: Files and folders of a deployment are private to its user.
UMASK = 0o077


@contextlib.contextmanager
def private_files():
    """Files and folders created meanwhile are private (umask 077; process-wide, restored)."""
    old = os.umask(UMASK)
    try:
        yield
    finally:
        os.umask(old)


def append_record(path: str | Path, record: dict) -> None:
    """Append ``record`` as one JSON line to the file ``path`` (created 0600, its folder 0700,
    when missing). Raises OSError."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=plain) + "\n")


def plain(x):
    """A JSON value for a numpy scalar or array (json's ``default``)."""
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def copy_app(src: Path, dst: Path) -> None:
    """Copy the app folder's files (not caches), contents only: the copies get the modes of
    new files (private under :func:`private_files`), not the source's."""
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if "__pycache__" in rel.parts or f.suffix == ".pyc" or not f.is_file():
            continue
        (dst / rel).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.copyfile(f, dst / rel)


def remove(path: Path) -> None:
    """Remove a file, link or folder tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class WorkDir:
    """``OUT/flower`` of one deployment (``path``); :attr:`claimed` once it is ours."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.claimed = False

    def owned(self) -> set[str]:
        """Names mmfl created here (the manifest's; empty when there is none)."""
        try:
            names = json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return set()
        return {n for n in names if n in OWNED} if isinstance(names, list) else set()

    def _write_manifest(self, names) -> None:
        (self.path / MANIFEST).write_text(json.dumps(sorted(names)) + "\n", encoding="utf-8")

    def claim(self) -> None:
        """Make the folder ready for a new deployment (call under :func:`private_files`):
        a ResultsError when a name of :data:`OWNED` exists but mmfl did not create it; what an
        earlier deployment created is removed (except :data:`RECORDS`); the manifest lists
        every name of :data:`OWNED` before any is written."""
        d = self.path
        if d.is_symlink() or (d.exists() and not d.is_dir()):
            raise ResultsError(f"{d}: exists and is not a folder mmfl created; move it away "
                               "or choose another --out")
        if d.exists():
            owned = self.owned()
            for name in OWNED:
                p = d / name
                if (p.exists() or p.is_symlink()) and name not in owned:
                    raise ResultsError(f"{p}: exists but was not created by mmfl; move it away "
                                       "or choose another --out")
            for name in sorted(owned - set(RECORDS)):
                remove(d / name)
        else:
            d.mkdir(mode=0o700)
        self._write_manifest(OWNED)
        self.claimed = True

    def clean(self, keep: set[str]) -> None:
        """Remove what mmfl created here except the names in ``keep``."""
        owned = self.owned()
        for name in owned - keep:
            with contextlib.suppress(OSError):
                remove(self.path / name)
        with contextlib.suppress(OSError), private_files():
            self._write_manifest(owned & keep)
