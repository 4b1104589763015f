"""The wheel installs one top-level package, ``nosasim``: the repository's runtime/, traces/ and analysis/ go in as
``nosasim.runtime``, ``nosasim.traces`` and ``nosasim.analysis``, so nothing generic (``runtime`` and ``traces`` are
other projects on the package index) can shadow a user's modules or be shadowed by them."""

from __future__ import annotations

import glob
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools")
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    # --no-build-isolation: no download; the build tree goes to a temporary folder, not into the checkout.
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(out), str(ROOT)], capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "TMPDIR": str(build)})
    if p.returncode != 0 and "No module named" in p.stderr and "wheel" in p.stderr:
        pytest.skip("this setuptools cannot build wheels without the 'wheel' package")
    assert p.returncode == 0, p.stderr[-2000:]
    (whl,) = glob.glob(str(out / "nosasim-*.whl"))
    return Path(whl)


def test_wheel_has_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"nosasim"}
    for need in ("nosasim/runtime/e2e.py", "nosasim/traces/record.py", "nosasim/analysis/validate.py",
                 "nosasim/traces/samples/smollm2-topics-8k.nosatrace", "nosasim/profiles/h200-pcie5.json"):
        assert need in names, need
    top_level = [n for n in names if n.endswith("top_level.txt")]
    if top_level:
        assert zipfile.ZipFile(wheel).read(top_level[0]).decode().split() == ["nosasim"]


def test_installed_layout_imports_and_finds_its_samples(wheel, tmp_path):
    """Unpacked as pip installs it, with this environment's dependencies but not its editable finder (no .pth
    processing, no working directory on the path): the moved packages import, ``runtime`` does not, and the CLI
    finds the bundled traces inside the package."""
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = (
        "import importlib, sys\n"
        f"sys.path[:0] = [{str(tmp_path)!r}]\n"
        f"sys.path.append({sysconfig.get_paths()['purelib']!r})\n"
        f"sys.path.append({sysconfig.get_paths()['platlib']!r})\n"
        "import nosasim.runtime.config, nosasim.traces.record, nosasim.analysis.validate\n"
        "from nosasim.cli import cmd_replay\n"
        f"assert str(cmd_replay.SAMPLES).startswith({str(tmp_path)!r}), cmd_replay.SAMPLES\n"
        "assert any(cmd_replay.SAMPLES.glob('*.nosatrace'))\n"
        "assert nosasim.traces.record._MODULE == 'nosasim.traces.record'\n"
        "for name in ('runtime', 'traces', 'analysis'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError:\n"
        "        continue\n"
        "    raise SystemExit(f'{name} is importable from the installed layout')\n"
        "print('ok')\n")
    p = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stdout[-1000:] + p.stderr[-2000:]
