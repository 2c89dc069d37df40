"""Wheels for a GPU machine without network that has torch and transformers but not this project's other needs.

    python scripts/gpu_wheels.py --have image_packages.txt --out .whl            # Python 3.12, x86-64 Linux

Takes the dependency closure of what the stages import beyond the image (dvc, dvclive, rouge-score, hydra,
bitsandbytes, galore-torch, liger-kernel) at the versions installed here, drops every package named in
``--have`` (one name a line: what the target image already holds), and fetches the rest for the target: a
binary wheel where PyPI has one, else a wheel built here from the source distribution (pure-Python packages
such as rouge-score publish none). Prints the total size, and the install command to run there.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOTS = ["dvc", "dvclive", "rouge-score", "hydra-core", "bitsandbytes", "galore-torch"]
GPU_ONLY = {"liger-kernel": "0.8.5"}  # the `gpu` extra, not installed on a CPU machine (its needs: torch, triton)
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str], have: set[str]) -> dict[str, str]:
    """name -> installed version for ``roots`` and what they require on the target, less ``have``."""
    found, todo = {norm(k): v for k, v in GPU_ONLY.items() if norm(k) not in have}, list(roots)
    while todo:
        name = norm(todo.pop())
        if name in found or name in have:
            continue
        dist = md.distribution(name)
        found[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate(TARGET):
                todo.append(req.name)
    return found


def fetch(name: str, version: str, out: Path) -> str:
    spec = f"{name}=={version}"
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", *(a for p in PLATFORMS for a in ("--platform", p)), "--platform", "any",
           "-d", str(out), spec]
    if subprocess.run(cmd, capture_output=True).returncode == 0:
        return "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), spec], check=True)
    return "built"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--have", type=Path, required=True, help="packages the target already has, one a line")
    parser.add_argument("--out", type=Path, default=Path(".whl"))
    args = parser.parse_args()
    have = {norm(line.split("==")[0].strip()) for line in args.have.read_text().splitlines() if line.strip()}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, version in sorted(closure(ROOTS, have).items()):
        print(f"{name}=={version}: {fetch(name, version, args.out)}", flush=True)
    size = sum(f.stat().st_size for f in args.out.glob("*.whl"))
    print(f"\n{len(list(args.out.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {args.out}; install there with\n"
          f"  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site {args.out}/*.whl "
          f"&& export PYTHONPATH=/tmp/site:$PWD")


if __name__ == "__main__":
    main()
