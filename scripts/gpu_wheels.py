"""Wheels for a GPU machine without network that has torch and transformers but not this project's other needs.

    python scripts/gpu_wheels.py --have image_packages.txt --out .whl            # Python 3.12, x86-64 Linux

Takes the dependency closure of what the stages import beyond the image (dvc, dvclive, rouge-score, hydra,
bitsandbytes, galore-torch, liger-kernel, transformers) at the versions installed here, drops every package named in
``--have`` (one name a line: what the target image already holds), and fetches the rest for the target: a
binary wheel where PyPI has one, else a wheel built here from the source distribution (pure-Python packages
such as rouge-score publish none). Prints the total size, and the install command to run there.

bitsandbytes' wheel holds a library for every CUDA and ROCm version it supports (43 MB of 62); ``--cuda 130``
rewrites it with only the CUDA 13.0 library (the one a torch built for CUDA 13.0 loads), so that everything fits
one 64 MiB carry.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

ROOTS = ["dvc", "dvclive", "rouge-score", "hydra-core", "bitsandbytes", "galore-torch", "transformers"]
# Carried at this machine's version whenever the image's differs (a name without a version in --have counts as
# different): an older transformers decodes grouped-query attention by copying keys and values per head, where
# ftstudy.decode relies on recent releases' single-query packing; tokenizers moves with it.
PINNED = {"transformers", "tokenizers"}
GPU_ONLY = {"liger-kernel": "0.8.5"}  # the `gpu` extra, not installed on a CPU machine (its needs: torch, triton)
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str], have: dict[str, str | None]) -> dict[str, str]:
    """name -> installed version for ``roots`` and what they require on the target, less what ``have`` (name ->
    version or None) holds; a ``PINNED`` package only where its version there is this machine's."""
    found, todo = {norm(k): v for k, v in GPU_ONLY.items() if norm(k) not in have}, list(roots)
    while todo:
        name = norm(todo.pop())
        if name in found or (name in have and (name not in PINNED or have[name] == md.version(name))):
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


def keep_one_cuda(wheel: Path, cuda: str) -> None:
    """Rewrite bitsandbytes' wheel without the GPU libraries of other CUDA and ROCm versions (RECORD to match)."""
    other = re.compile(rf"libbitsandbytes_(rocm\d+|cuda(?!{cuda}\.)\d+)\.so$")
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        names = [n for n in src.namelist() if not other.search(n)]
        if not any(f"libbitsandbytes_cuda{cuda}.so" in n for n in names):
            raise SystemExit(f"{wheel.name} has no library for CUDA {cuda}")
        for name in names:
            data = src.read(name)
            if name.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(keepends=True)
                               if not other.search(line.split(",")[0])).encode()
            dst.writestr(src.getinfo(name), data)
    tmp.replace(wheel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--have", type=Path, required=True, help="packages the target already has, one a line "
                        "(`name` or `name==version`, e.g. its pip freeze)")
    parser.add_argument("--out", type=Path, default=Path(".whl"))
    parser.add_argument("--cuda", help="keep only this CUDA version's bitsandbytes library (e.g. 130 for CUDA 13.0)")
    args = parser.parse_args()
    have = {norm(name.strip()): (version.strip() or None)
            for name, _, version in (line.partition("==") for line in args.have.read_text().splitlines() if line.strip())}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, version in sorted(closure(ROOTS, have).items()):
        print(f"{name}=={version}: {fetch(name, version, args.out)}", flush=True)
    if args.cuda:
        for wheel in args.out.glob("bitsandbytes-*.whl"):
            keep_one_cuda(wheel, args.cuda)
    size = sum(f.stat().st_size for f in args.out.glob("*.whl"))
    print(f"\n{len(list(args.out.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {args.out}; install there with\n"
          f"  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site {args.out}/*.whl "
          f"&& export PYTHONPATH=/tmp/site:$PWD")


if __name__ == "__main__":
    main()
