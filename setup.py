"""Build hook: the wheel carries the generated ``heist`` package and the shipped config.

Why a hook: ``generated/heist`` is git-ignored (``protos/`` is the source), so a
wheel built from a clean clone (``pip install .``) has to run the same generation
as ``make protos``; and ``config/heist.yaml`` stays the one copy under version
control, copied into ``heist_common/shipped/`` only inside the wheel, where an
installed user finds it (``heist_common.layout.shipped_config_path``). Everything
else is declared in pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def proto_generator() -> ModuleType:
    """``protos/generate.py`` as a module (it is a script, not part of any package)."""
    spec = importlib.util.spec_from_file_location("heist_protos_generate", ROOT / "protos" / "generate.py")
    if spec is None or spec.loader is None:
        raise RuntimeError("cannot load protos/generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildWithContracts(build_py):
    """``build_py``, then the contracts generated fresh and the config copied into the build folder."""

    def run(self) -> None:
        """Copy the sources, then add what the repository keeps outside them.

        The editable install (``make install``) imports ``generated/`` and
        ``config/`` from the checkout itself, so it needs neither.
        """
        super().run()
        if self.editable_mode:
            return
        build_root = Path(self.build_lib)
        proto_generator().generate(build_root)
        shipped = build_root / "heist_common" / "shipped"
        shipped.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / "config" / "heist.yaml", shipped / "heist.yaml")


setup(cmdclass={"build_py": BuildWithContracts})
