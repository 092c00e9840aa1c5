"""The wheel as a user gets it: built from the sources, installed into a fresh virtual environment
without the source tree, it runs `nntrain fit` and imports the bridge as `nntrain.adapters`.

The wheel is built without build isolation (no download of setuptools) from a copy of the files a
build reads, so a stale `build/` folder in the checkout cannot leak into it. The environment sees
the running interpreter's packages (torch, lightning, ...: nothing to download); the wheel goes in
with `--no-deps`, and the test checks that `nntrain` is imported from it, not from the checkout or
an editable install. ~10 s.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
VERSION = PROJECT["version"]


def _env() -> dict[str, str]:
    """The environment without anything that puts the checkout on the path or asks the network."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


def _run(args: list[str | Path], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{args} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def _source_copy(dest: Path) -> Path:
    """What a build reads, copied: pyproject, README, LICENSE, nntrain/ (without a dev checkout's
    nntrain/adapters link) and adapters/."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, dest / name)

    def package_files(folder: str, names: list[str]) -> set[str]:
        link = {"adapters"} if Path(folder).resolve() == (ROOT / "nntrain").resolve() else set()
        return set(skip(folder, names)) | link

    shutil.copytree(ROOT / "nntrain", dest / "nntrain", ignore=package_files)
    shutil.copytree(ROOT / "adapters", dest / "adapters", ignore=skip)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build the wheel, make a fresh venv, install the wheel there; the paths of each."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = _source_copy(tmp / "src")
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", dist, src], cwd=tmp)
    (wheel,) = dist.glob("nntrain-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    if sys.prefix != sys.base_prefix:  # run from a venv: --system-site-packages sees the base, not this one
        purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                            cwd=tmp).stdout.strip())
        (purelib / "_outer_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # --ignore-installed: an editable nntrain in the outer environment is neither used nor uninstalled
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel], cwd=tmp)
    work = tmp / "work"  # an empty working directory: nothing importable from the cwd
    work.mkdir()
    return {"wheel": wheel, "venv": venv, "python": python, "work": work}


def test_the_wheel_holds_every_module_the_license_and_py_typed(installed):
    expected = {f"nntrain/{p.relative_to(ROOT / 'nntrain').as_posix()}" for p in (ROOT / "nntrain").rglob("*.py")
                if "adapters" not in p.relative_to(ROOT / "nntrain").parts}
    expected |= {f"nntrain/adapters/{p.relative_to(ROOT / 'adapters').as_posix()}"
                 for p in (ROOT / "adapters").rglob("*.py")}
    with zipfile.ZipFile(installed["wheel"]) as wheel:
        names = set(wheel.namelist())
        info = f"nntrain-{VERSION}.dist-info"
        metadata = wheel.read(f"{info}/METADATA").decode()
    assert expected - names == set(), "modules missing from the wheel (a package not listed in pyproject.toml?)"
    assert {n for n in names if n.endswith(".py")} == expected
    assert "nntrain/py.typed" in names and f"{info}/licenses/LICENSE" in names
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    assert f"Requires-Python: {PROJECT['requires-python']}" in metadata.splitlines()


def test_the_installed_package_imports_from_the_venv_and_nntrain_fit_runs(installed):
    # one process (torch and Lightning imported once): the package and the bridge come from the venv, then the
    # main job runs as `nntrain fit` runs it; the console script itself answers --version
    code = ("import json, sys, nntrain, nntrain.adapters; print(json.dumps([nntrain.__file__, "
            "nntrain.adapters.__file__, nntrain.__version__, nntrain.adapters.to_lightning.__module__])); "
            "from nntrain.cli import main; sys.exit(main(['fit', '--epochs', '1', '--logdir', 'runs']))")
    work = installed["work"]
    first, *rest = _run([installed["python"], "-c", code], cwd=work).stdout.splitlines()
    package, bridge, version, module = json.loads(first)
    venv = installed["venv"].resolve()
    assert Path(package).resolve().is_relative_to(venv), package
    assert Path(bridge).resolve().is_relative_to(venv), bridge
    assert version == VERSION and module == "nntrain.adapters.fit"
    assert any(line.startswith("1/1 epochs") for line in rest), rest
    assert list((work / "runs").glob("native-*/version_0"))
    out = _run([installed["venv"] / "bin" / "nntrain", "--version"], cwd=work).stdout
    assert out.strip() == f"nntrain {VERSION}"
