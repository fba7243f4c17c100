"""The run folder: where every process of the mesh keeps its state, in one agreed layout.

The supervisor writes pid files and logs there, the OAuth server generates dev
credentials there, the orchestrator reads client secrets and writes the audit
database and session logs there; this module is the one place that says where.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
"""Relative paths in the config are resolved against the repository root."""


def anchored(path: Path) -> Path:
    """Expand ``~`` and resolve a relative config path against the repository root."""
    path = path.expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


class RunFolder:
    """Paths inside ``run_dir`` (mixed into the config's ``mesh`` section)."""

    run_dir: Path

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
