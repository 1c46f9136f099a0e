"""Third-party backends found through the ``bitsmith.backends`` entry-point group."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bitsmith.backends.base import backends
from bitsmith.errors import PluginError

REPO = Path(__file__).resolve().parents[1]

GOOD_PLUGIN = '''
from bitsmith.backends.base import Backend
from bitsmith.backends.reference import ReferenceExecutable

class FakeBackend(Backend):
    name = "fake"
    targets = ("fake-sim",)

    def build(self, module, target, options):
        return ReferenceExecutable(module)

    def load(self, module, target, options, files):
        return ReferenceExecutable(module)
'''

BROKEN_PLUGINS = {
    "import_error": "raise ImportError('needs libfake.so')\n",
    "not_a_backend": "class FakeBackend:\n    name = 'fake'\n    targets = ('fake-sim',)\n",
}


def install_plugin(where: Path, source: str) -> Path:
    """A distribution ``fakeplug`` on path ``where``: dist-info metadata plus its module."""
    info = where / "fakeplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[bitsmith.backends]\nfake = fakeplug_mod:FakeBackend\n")
    (where / "fakeplug_mod.py").write_text(source)
    return where


def bitsmith_targets(plugin_path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin_path), str(REPO)]))
    return subprocess.run([sys.executable, "-m", "bitsmith", "targets"], env=env,
                          capture_output=True, text=True, timeout=120)


def test_plugin_targets_are_listed(tmp_path: Path):
    result = bitsmith_targets(install_plugin(tmp_path, GOOD_PLUGIN))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.split() == ["fake-sim", "fake"] for line in lines), lines
    assert any(line.split() == ["reference", "reference"] for line in lines), lines


@pytest.mark.parametrize("kind", sorted(BROKEN_PLUGINS))
def test_broken_plugin_is_one_line_error(tmp_path: Path, kind: str):
    result = bitsmith_targets(install_plugin(tmp_path, BROKEN_PLUGINS[kind]))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bitsmith: error: "), result.stderr
    assert "'fake'" in lines[0] and "fakeplug_mod:FakeBackend" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.fixture
def on_sys_path(tmp_path: Path):
    """Puts tmp_path on sys.path; afterwards removes it, the plugin module and the cached registry."""
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("fakeplug_mod", None)
        importlib.invalidate_caches()
        backends(refresh=True)


def test_broken_plugin_raises_plugin_error_in_process(on_sys_path: Path):
    install_plugin(on_sys_path, BROKEN_PLUGINS["import_error"])
    with pytest.raises(PluginError, match=r"plugin 'fake' \(fakeplug_mod:FakeBackend\) failed to load: "
                                          r"ImportError: needs libfake.so"):
        backends(refresh=True)


def test_registry_recovers_once_the_plugin_is_gone(on_sys_path: Path):
    install_plugin(on_sys_path, GOOD_PLUGIN)
    assert backends(refresh=True)["fake"].targets == ("fake-sim",)
    sys.path.remove(str(on_sys_path))
    importlib.invalidate_caches()
    try:
        assert "fake" not in backends(refresh=True)
    finally:
        sys.path.insert(0, str(on_sys_path))
