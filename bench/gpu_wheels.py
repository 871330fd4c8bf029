"""Gather the wheels the GPU check needs and a lent GPU machine lacks: ``python -m bench.gpu_wheels``.

The GPU machines lent to this project run CUDA PyTorch on CPython 3.12 (x86_64 Linux, manylinux) with
timm, einops, peft, safetensors, pyarrow, tensorboard, tqdm, matplotlib and huggingface_hub, but without
DeepSpeed, webdataset or rasterio, and without network. Run here, where a package registry can be
reached, this script fills :data:`bench.gpu_check.WHEELS` (``bench/wheels/``, git-ignored, carried to
the GPU machine beside the repository) with one wheel of every distribution in the ``Requires-Dist``
closure of :data:`ROOTS` (extras skipped, markers evaluated for CPython 3.12 on Linux x86_64), PyTorch
and numpy aside (:data:`SKIP`):

- the version this interpreter (the project's ``.venv``) has installed, else the newest that fits;
- binary wheels for ``cp312`` / ``abi3`` / ``py3`` on manylinux x86_64 up to glibc 2.28
  (:data:`PLATFORMS`), checked against the file names' tags;
- DeepSpeed, which PyPI ships as a source archive only, built here as a pure ``py3-none-any`` wheel
  with no prebuilt ops (``DS_BUILD_OPS=0``): its ops, which the check does not use, would be JIT-built.

It writes ``manifest.json`` beside the wheels (the contract is :func:`bench.gpu_check.read_manifest`'s):
each wheel's name, version, file, sha256 and its own requirements, so that the check installs only the
wheels whose distributions the GPU machine lacks or has at a version that does not fit (its numpy and
typing-extensions, say, stay). Run it again and it downloads only what is missing and removes wheels
no longer wanted: one version of each distribution, at most :data:`MAX_MB` MB in all.
"""

from __future__ import annotations

import argparse
import ast
import email.parser
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import NormalizedName, canonicalize_name, parse_wheel_filename
from packaging.version import Version

from bench.gpu_check import MANIFEST, REPO, WHEELS

#: What the check imports that the GPU machine lacks; their requirement strings are gfm's own.
ROOTS = ("deepspeed", "webdataset", "rasterio")
#: Never shipped: the GPU machine's own CUDA PyTorch is the one to measure, and its numpy (which its
#: matplotlib, peft, tensorboard and torchvision require) is 17 MB that would only shadow it.
SKIP = frozenset({"torch", "numpy"})
#: The GPU machine's interpreter, for markers (``python_version < "3.11"`` ...) and wheel tags.
PYTHON = (3, 12)
TARGET_ENV = {
    "implementation_name": "cpython", "implementation_version": "3.12.0", "os_name": "posix",
    "platform_machine": "x86_64", "platform_python_implementation": "CPython", "platform_release": "",
    "platform_system": "Linux", "platform_version": "", "python_full_version": "3.12.0", "python_version": "3.12",
    "sys_platform": "linux", "extra": "",
}
#: manylinux x86_64 up to glibc 2.28 (what CUDA PyTorch wheels themselves need), newest first.
PLATFORMS = tuple(f"manylinux_2_{n}_x86_64" for n in range(28, 4, -1)) + (
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64")
SUPPORTED_TAGS = frozenset(cpython_tags(PYTHON, abis=["cp312"], platforms=PLATFORMS)) | frozenset(
    compatible_tags(PYTHON, "cp312", platforms=PLATFORMS))
#: The wheel folder travels with the repository to the GPU machine: keep it small.
MAX_MB = 60.0


class GatherError(RuntimeError):
    """A wheel that cannot be had or does not fit the GPU machine; the message names it."""


def root_requirements() -> list[Requirement]:
    """The requirements of gfm on :data:`ROOTS` (``deepspeed>=0.15`` ...), as installed from ``pyproject.toml``."""
    try:
        lines = importlib.metadata.requires("gfm") or []
    except importlib.metadata.PackageNotFoundError as e:
        raise GatherError("gfm is not installed in this interpreter; run this with the project's .venv") from e
    by_name = {canonicalize_name(r.name): r for r in for_target(lines)}
    missing = [n for n in ROOTS if n not in by_name]
    if missing:
        raise GatherError(f"gfm's installed requirements have no {', '.join(missing)} (pyproject.toml changed? "
                          "reinstall with `make venv`)")
    return [by_name[canonicalize_name(n)] for n in ROOTS]


def for_target(lines: Iterable[str]) -> list[Requirement]:
    """The ``Requires-Dist`` lines that hold on the GPU machine (markers evaluated there, extras dropped)."""
    out = []
    for line in lines:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(dict(TARGET_ENV)):
            req.marker = None
            out.append(req)
    return out


def fits_target(file: str) -> bool:
    """Whether the wheel ``file`` installs on CPython 3.12, manylinux x86_64 up to glibc 2.28."""
    return bool(set(parse_wheel_filename(file)[3]) & SUPPORTED_TAGS)


def describe(wheel: Path) -> dict[str, Any]:
    """One manifest row: name, version, file, sha256 and the requirements that hold on the GPU machine."""
    with zipfile.ZipFile(wheel) as z:
        meta_name = next((n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")), None)
        if meta_name is None:
            raise GatherError(f"{wheel}: no *.dist-info/METADATA inside")
        meta = email.parser.Parser().parsestr(z.read(meta_name).decode())
    return {
        "name": str(canonicalize_name(meta["Name"])), "version": meta["Version"], "file": wheel.name,
        "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
        "requires": [str(r) for r in for_target(meta.get_all("Requires-Dist") or [])],
    }


def write_manifest(folder: Path, roots: Iterable[Requirement], rows: list[dict[str, Any]]) -> Path:
    """``folder/manifest.json``: the roots to install from, the wheels and what was left out (:data:`SKIP`)."""
    manifest = {
        "python": ".".join(map(str, PYTHON)), "platforms": list(PLATFORMS), "roots": [str(r) for r in roots],
        "skipped": sorted(SKIP), "wheels": sorted(rows, key=lambda r: r["name"]),
        "total_bytes": sum((folder / r["file"]).stat().st_size for r in rows),
    }
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def _wheels_of(folder: Path, name: NormalizedName) -> list[tuple[Version, Path]]:
    found = []
    for path in folder.glob("*.whl"):
        wheel_name, version, _, _ = parse_wheel_filename(path.name)
        if wheel_name == name:
            found.append((version, path))
    return sorted(found)


def _pip(args: list[str], env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-4:])
        raise GatherError(f"`{' '.join(cmd)}` exited {proc.returncode}: {tail}")


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def build_deepspeed(version: str, folder: Path) -> Path:
    """DeepSpeed ``version`` as a pure wheel with no prebuilt ops, built from its source archive."""
    env = dict(os.environ, DS_BUILD_OPS="0")
    _pip(["wheel", "-q", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-w", str(folder),
          f"deepspeed=={version}"], env)
    found = [p for v, p in _wheels_of(folder, canonicalize_name("deepspeed")) if str(v) == version]
    if not found or not found[0].name.endswith("-py3-none-any.whl"):
        raise GatherError(f"{folder}: building deepspeed=={version} gave {[p.name for p in found]}, "
                          f"expected deepspeed-{version}-py3-none-any.whl")
    _check_no_ops(found[0])
    return found[0]


def _check_no_ops(wheel: Path) -> None:
    """A DeepSpeed wheel with a prebuilt op would load a binary built against this machine's torch."""
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        binaries = [n for n in names if n.endswith(".so")]
        info = "deepspeed/git_version_info_installed.py"
        ops: dict[str, bool] = {}
        if info in names:
            for line in z.read(info).decode().splitlines():
                if line.startswith("installed_ops="):
                    ops = ast.literal_eval(line.split("=", 1)[1])
    built = sorted(k for k, v in ops.items() if v)
    if binaries or built:
        raise GatherError(f"{wheel}: has prebuilt ops {built or binaries}, expected none (DS_BUILD_OPS=0)")


def fetch(req: Requirement, folder: Path) -> Path:
    """The wheel of ``req`` in ``folder``, downloaded (DeepSpeed: built) unless already there.

    The version is this interpreter's where it has the distribution, else the newest that fits ``req``.
    """
    name = canonicalize_name(req.name)
    pinned = _installed_version(name)
    if pinned is not None and not req.specifier.contains(pinned, prereleases=True):
        raise GatherError(f"{req.name}: this interpreter has {pinned}, which does not satisfy {req}")
    have = [p for v, p in _wheels_of(folder, name) if pinned is None or str(v) == pinned]
    if have and fits_target(have[-1].name):
        return have[-1]
    if name == "deepspeed":
        if pinned is None:
            raise GatherError("deepspeed: not installed in this interpreter; run this with the project's .venv")
        return build_deepspeed(pinned, folder)
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    _pip(["download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", ".".join(map(str, PYTHON)),
          "--implementation", "cp", *platforms, "-d", str(folder),
          f"{req.name}=={pinned}" if pinned else str(req)])
    have = [p for v, p in _wheels_of(folder, name) if pinned is None or str(v) == pinned]
    if not have:
        raise GatherError(f"{req}: pip download put no wheel of it into {folder}")
    return have[-1]


def gather(folder: Path = WHEELS) -> Path:
    """Fill ``folder`` with the :data:`ROOTS` closure for the GPU machine and write its manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    roots = root_requirements()
    todo, rows = list(roots), dict[str, dict[str, Any]]()
    while todo:
        req = todo.pop(0)
        name = canonicalize_name(req.name)
        if name in SKIP:
            continue
        if name in rows:
            if not req.specifier.contains(rows[name]["version"], prereleases=True):
                raise GatherError(f"{req}: the wheel gathered is {name} {rows[name]['version']}")
            continue
        wheel = fetch(req, folder)
        if not fits_target(wheel.name):
            raise GatherError(f"{wheel}: tags {sorted(map(str, parse_wheel_filename(wheel.name)[3]))} do not fit "
                              f"CPython 3.12 on manylinux x86_64 (glibc <= 2.28)")
        rows[name] = describe(wheel)
        print(f"  {name} {rows[name]['version']}: {wheel.name}", file=sys.stderr, flush=True)
        todo.extend(Requirement(r) for r in rows[name]["requires"])
    kept = {r["file"] for r in rows.values()}
    for stale in sorted(p for p in folder.glob("*.whl") if p.name not in kept):  # other versions, old deps
        print(f"  removing {stale.name}", file=sys.stderr)
        stale.unlink()
    manifest = write_manifest(folder, roots, list(rows.values()))
    total_mb = json.loads(manifest.read_text())["total_bytes"] / 1e6
    if total_mb > MAX_MB:
        raise GatherError(f"{folder}: {total_mb:.1f} MB of wheels, expected at most {MAX_MB:.0f} MB")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Gather the wheels; print one line per wheel and the total."""
    p = argparse.ArgumentParser(prog="python -m bench.gpu_wheels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=WHEELS, help=f"wheel folder (default: {WHEELS.relative_to(REPO)})")
    args = p.parse_args(argv)
    try:
        manifest = gather(args.out)
    except GatherError as e:
        print(f"gpu wheels: {e}", file=sys.stderr)
        return 2
    data = json.loads(manifest.read_text())
    for row in data["wheels"]:
        print(f"{row['name']:<20} {row['version']:<14} {(args.out / row['file']).stat().st_size / 1e6:6.2f} MB  "
              f"{row['file']}")
    print(f"{len(data['wheels'])} wheels, {data['total_bytes'] / 1e6:.1f} MB; wrote {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
