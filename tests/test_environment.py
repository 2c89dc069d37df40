"""The pinned environment: requirements/lock.txt covers pyproject.toml's dependencies and is what got installed."""

import importlib.metadata as md
import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
UNLOCKED = {"torch"}  # setup.sh installs the build that fits the machine (CPU or CUDA)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    """name -> version for the pins that apply to this interpreter."""
    pins = {}
    for line in (ROOT / "requirements/lock.txt").read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate():
                pins[_norm(req.name)] = str(req.specifier).removeprefix("==")
    return pins


def test_the_lock_pins_every_dependency_of_pyproject_but_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"]) + [d for ds in project["optional-dependencies"].values() for d in ds]
    names = {_norm(Requirement(d).name) for d in wanted} - UNLOCKED
    pins = _pins()
    assert names - pins.keys() == set(), "run `bash scripts/lock.sh` after editing pyproject.toml"
    for d in map(Requirement, wanted):
        if _norm(d.name) in pins:
            assert pins[_norm(d.name)] in d.specifier, f"{d.name} {pins[_norm(d.name)]} is outside {d.specifier}"


def test_the_installed_packages_are_the_locked_versions():
    """scripts/setup.sh installs with the lock as constraints: what runs here is what the lock says."""
    off = {}
    for name, version in _pins().items():
        try:
            installed = md.version(name)
        except md.PackageNotFoundError:
            continue  # an extra this machine did not install (e.g. the gpu extra on a CPU machine)
        if installed != version:
            off[name] = (installed, version)
    assert off == {}, f"installed vs locked: {off}; reinstall with `bash scripts/setup.sh --dev`"
