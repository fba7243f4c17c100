"""The run folder: where every process of the mesh keeps its state, in one agreed layout.

The supervisor writes pid files and logs there, the OAuth server generates dev
credentials there, the orchestrator reads client secrets and writes the audit
database and session logs there; this module is the one place that says where.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PACKAGE_PARENT = Path(__file__).resolve().parent.parent
"""The folder ``heist_common`` is imported from: a checkout's root, or site-packages of an installed wheel."""

IN_CHECKOUT = (PACKAGE_PARENT / "pyproject.toml").is_file() and (PACKAGE_PARENT / "protos").is_dir()
"""True when running from the repository (editable install included), False from an installed wheel."""


def _working_directory() -> Path:
    try:
        return Path(os.getcwd())
    except FileNotFoundError:  # the folder was deleted under the process: nothing relative can be found anyway
        return Path.home()


REPO_ROOT = PACKAGE_PARENT if IN_CHECKOUT else _working_directory()
"""Relative paths in the config are resolved against this folder.

In a checkout it is the repository root, wherever the command runs from. An
installed wheel has no repository, so the folder the process started in plays
its part (``config/heist.yaml`` is looked for and ``var/`` is made there): the
supervisor starts its children in this folder, so every process of one mesh
resolves the same paths.
"""


def anchored(path: Path) -> Path:
    """Expand ``~`` and resolve a relative config path against ``REPO_ROOT``."""
    path = path.expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def shipped_config_path() -> Path:
    """Return the config file the project ships: ``config/heist.yaml`` in a checkout, package data in a wheel.

    The wheel's copy is made from the repository's file when the wheel is built
    (setup.py), so the repository keeps the only copy under version control.
    """
    if IN_CHECKOUT:
        return PACKAGE_PARENT / "config" / "heist.yaml"
    return Path(__file__).resolve().parent / "shipped" / "heist.yaml"


PRIVATE_UMASK = 0o077
"""Files 0600 and folders 0700: the run folder holds conversations, logs and credentials of one user."""


def use_private_umask() -> int:
    """Make what this process and its children create readable by the owner only; return the previous umask.

    Every entry point that writes into the run folder calls this first (the
    orchestrator CLI, the supervisor, each server process); the processes they
    start inherit it.
    """
    return os.umask(PRIVATE_UMASK)


def make_private(path: Path) -> None:
    """Take the group and other permissions away from a file or folder we own, if it exists.

    Left alone: a symbolic link, something another user owns, a folder with the
    sticky bit (shared on purpose, like ``/tmp``), and a read-only file system
    (a mounted volume: nothing new can be written there either).
    """
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode) or info.st_uid != os.geteuid():
        return
    if stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX:
        return
    mode = stat.S_IMODE(info.st_mode)
    if mode & PRIVATE_UMASK:
        try:
            os.chmod(path, mode & ~PRIVATE_UMASK)
        except OSError:
            return


class RunFolder:
    """Paths inside ``run_dir`` (mixed into the config's ``mesh`` section)."""

    run_dir: Path

    @property
    def audit_dir(self) -> Path:
        """The default SQLite audit database (``database.url`` unset)."""
        return self.run_dir / "audit"

    @property
    def credentials_dir(self) -> Path:
        """Generated local development credentials (git-ignored)."""
        return self.run_dir / "credentials"

    @property
    def pid_dir(self) -> Path:
        """Pid files of the processes the supervisor started."""
        return self.run_dir / "run"

    @property
    def log_dir(self) -> Path:
        """One log file per supervised process."""
        return self.run_dir / "log"

    @property
    def data_dir(self) -> Path:
        """Generated data such as the bank database."""
        return self.run_dir / "data"

    @property
    def models_dir(self) -> Path:
        """The assembled embedded model."""
        return self.run_dir / "models"

    @property
    def sessions_dir(self) -> Path:
        """Exported session logs (JSON and Markdown)."""
        return self.run_dir / "sessions"

    def make_private(self) -> None:
        """Tighten the run folder and every folder directly in it to 0700 (an older version made them 0755).

        New files and folders are private through ``use_private_umask``; a
        private folder also hides whatever older, looser files it still holds.
        """
        make_private(self.run_dir)
        try:
            children = [child for child in self.run_dir.iterdir() if child.is_dir() and not child.is_symlink()]
        except OSError:  # not there yet, or not ours to list
            return
        for child in children:
            make_private(child)
