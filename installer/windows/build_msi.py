"""Build ``tillsync-<version>.msi`` on Linux with ``wixl`` (Debian packages wixl, msitools).

What goes into the MSI (wixl cannot run pip, so everything is laid out here, ahead of time):

1. the project's wheel, built from this checkout;
2. every runtime dependency as a CPython 3.11 ``win_amd64`` wheel, plus ``pywin32`` (the
   service host), ``tzdata`` and ``colorama`` (dependencies that pip would only pick for a
   Windows interpreter: markers are judged on the build machine, not the target);
3. all of them unpacked into one ``lib`` tree, exactly as ``pip install --target`` would
   leave it (minus pywin32's IDE, demos and tests), so the target needs no pip and no network.

The target supplies the interpreter: CPython 3.11 (64-bit) installed for all users; the MSI
finds it in the registry (docs/install-windows.md). ``tillsync.wxs`` holds the service, the
folders and the custom actions; this script generates a fragment with one component per
file of ``lib`` and runs wixl on both.

    python -m installer.windows.build_msi --out dist/ [--wheelhouse DIR] [--stage DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from xml.sax.saxutils import quoteattr

ROOT = Path(__file__).resolve().parents[2]
WXS = Path(__file__).with_name("tillsync.wxs")
PYTHON_VERSION = "3.11"  # the wheels' ABI: the target's interpreter must be this version
PLATFORM = "win_amd64"
# Picked by environment markers only on Windows, so pip on Linux would leave them out.
WINDOWS_EXTRAS = ("pywin32", "tzdata", "colorama")
# The service executable lives in the main .wxs (it carries ServiceInstall), not the fragment.
SERVICE_EXE = "lib/win32/pythonservice.exe"
# Directories the main .wxs declares, with the ids the fragment refers to.
KNOWN_DIRS = {"": "INSTALLDIR", "lib": "LIBDIR", "lib/win32": "PYWIN32DIR"}
# Not needed to host a service: pywin32's IDE, ADO and ISAPI bindings, COM extensions, help.
_SKIP_TOP = {"pythonwin", "adodbapi", "isapi", "win32comext", "PyWin32.chm"}
_SKIP_PARTS = {"__pycache__", "test", "tests", "Demos", "demos"}


class BuildError(Exception):
    """The MSI could not be built; the message says what is missing."""


def project_version(pyproject: Path = ROOT / "pyproject.toml") -> str:
    """Return the version in pyproject.toml."""
    with pyproject.open("rb") as handle:
        return str(tomllib.load(handle)["project"]["version"])


def msi_version(version: str) -> str:
    """Return the MSI ProductVersion for a Python version: its first three numbers."""
    numbers = re.match(r"^(\d+)(?:\.(\d+))?(?:\.(\d+))?", version)
    if numbers is None:
        raise BuildError(f"version {version!r} does not start with a number")
    return ".".join(part or "0" for part in numbers.groups())


def msi_name(version: str) -> str:
    """Return the file name of the MSI for ``version``."""
    return f"tillsync-{version}.msi"


def find_wixl() -> str:
    """Return the path of wixl, or raise BuildError saying how to install it."""
    wixl = shutil.which("wixl")
    if wixl is None:
        raise BuildError("wixl not found: install it with `apt-get install -y wixl msitools`"
                         " (Debian 12 ships wixl as its own package)")
    return wixl


def build_project_wheel(dest: Path) -> Path:
    """Build this checkout's wheel into ``dest``, from a clean copy of the sources."""
    # setuptools builds in ./build and never empties it: a module deleted from the checkout
    # would still ship. A fresh copy of the sources has no such leftovers.
    source = dest.parent / "source"
    if source.exists():
        shutil.rmtree(source)
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"))
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dest),
          str(source)])
    wheels = sorted(dest.glob("tillsync-*.whl"))
    if not wheels:
        raise BuildError(f"pip wheel left no tillsync wheel in {dest}")
    return wheels[-1]


def download_wheelhouse(project_wheel: Path, wheelhouse: Path) -> None:
    """Fetch the Windows wheels of every dependency into ``wheelhouse`` (kept ones are reused)."""
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
          "--platform", PLATFORM, "--python-version", PYTHON_VERSION,
          "--implementation", "cp", "--abi", "cp" + PYTHON_VERSION.replace(".", ""),
          "-d", str(wheelhouse), str(project_wheel), *WINDOWS_EXTRAS])


def unpack_wheels(wheels: Iterable[Path], lib: Path) -> None:
    """Unpack wheels into ``lib`` the way an install into a target directory lays them out."""
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for info in archive.infolist():
                target = _install_path(info.filename)
                if info.is_dir() or target is None:
                    continue
                out = lib.joinpath(*target.parts)
                out.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, out.open("wb") as dst:
                    shutil.copyfileobj(src, dst)


def _install_path(name: str) -> PurePosixPath | None:
    path = PurePosixPath(name)
    if ".." in path.parts or path.is_absolute():
        raise BuildError(f"unsafe path in a wheel: {name}")
    top = path.parts[0]
    if top.endswith(".data"):
        # purelib/platlib go where the packages go; scripts, headers and data do not run here.
        if len(path.parts) < 3 or path.parts[1] not in ("purelib", "platlib"):
            return None
        path = PurePosixPath(*path.parts[2:])
        top = path.parts[0]
    if top in _SKIP_TOP or _SKIP_PARTS.intersection(path.parts[:-1]):
        return None
    return path


def stage(stage_dir: Path, wheelhouse: Path | None) -> Path:
    """Lay out the files of the MSI under ``stage_dir``; return it."""
    wheels_dir = stage_dir / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    project_wheel = build_project_wheel(wheels_dir)
    house = wheelhouse or stage_dir / "wheelhouse"
    house.mkdir(parents=True, exist_ok=True)
    download_wheelhouse(project_wheel, house)
    lib = stage_dir / "files" / "lib"
    if lib.exists():
        shutil.rmtree(lib)
    others = [w for w in sorted(house.glob("*.whl")) if not w.name.startswith("tillsync-")]
    unpack_wheels([*others, project_wheel], lib)
    if not (stage_dir / "files" / SERVICE_EXE).exists():
        raise BuildError(f"{SERVICE_EXE} missing: the pywin32 wheel was not unpacked")
    return stage_dir / "files"


def fragment(files_root: Path) -> str:
    """Return a WiX fragment with one component per staged file (group ``AppFiles``)."""
    files = sorted(p.relative_to(files_root).as_posix() for p in files_root.rglob("*")
                   if p.is_file())
    files = [f for f in files if f != SERVICE_EXE]
    by_dir: dict[str, list[str]] = {}
    for rel in files:
        parent = str(PurePosixPath(rel).parent)
        by_dir.setdefault("" if parent == "." else parent, []).append(rel)
    all_dirs = {d for rel in files for d in _ancestors(rel)}
    lines = ['<?xml version="1.0" encoding="utf-8"?>',
             '<Wix xmlns="http://schemas.microsoft.com/wix/2006/wi">', "<Fragment>"]
    refs: list[str] = []

    def emit(directory: str, depth: int) -> None:
        pad = "  " * depth
        for rel in by_dir.get(directory, []):
            key = _id("c", rel)
            refs.append(key)
            lines.append(f'{pad}<Component Id="{key}" Guid="*" Win64="yes">'
                         f'<File Id="{_id("f", rel)}" Name={quoteattr(PurePosixPath(rel).name)}'
                         f' Source={quoteattr(rel)} KeyPath="yes"/>'
                         "</Component>")
        children = sorted(d for d in all_dirs if str(PurePosixPath(d).parent) ==
                          (directory or ".") and d not in KNOWN_DIRS)
        for child in children:
            lines.append(f'{pad}<Directory Id="{_id("d", child)}"'
                         f" Name={quoteattr(PurePosixPath(child).name)}>")
            emit(child, depth + 1)
            lines.append(f"{pad}</Directory>")

    for known, ident in KNOWN_DIRS.items():
        lines.append(f'<DirectoryRef Id="{ident}">')
        emit(known, 1)
        lines.append("</DirectoryRef>")
    lines.append('<ComponentGroup Id="AppFiles">')
    lines += [f'  <ComponentRef Id="{ref}"/>' for ref in refs]
    lines += ["</ComponentGroup>", "</Fragment>", "</Wix>", ""]
    return "\n".join(lines)


def _ancestors(rel: str) -> list[str]:
    parents = [str(p) for p in PurePosixPath(rel).parents if str(p) != "."]
    return parents


def _id(prefix: str, rel: str) -> str:
    # MSI identifiers: at most 72 characters, letters, digits, _ and .; stable across builds.
    return f"{prefix}_{hashlib.sha1(rel.encode(), usedforsecurity=False).hexdigest()}"


def build(out_dir: Path, *, wheelhouse: Path | None = None, stage_dir: Path | None = None,
          version: str | None = None) -> Path:
    """Build the MSI into ``out_dir``; return its path."""
    wixl = find_wixl()
    version = version or project_version()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tillsync-msi-") as scratch:
        work = stage_dir or Path(scratch)
        files_root = stage(work, wheelhouse)
        frag = work / "files.wxs"
        frag.write_text(fragment(files_root), encoding="utf-8")
        msi = out_dir / msi_name(version)
        # wixl resolves File/@Source against its working directory (absolute paths fail).
        _run([wixl, "--arch", "x64", "-D", f"Version={msi_version(version)}",
              "-o", str(msi.absolute()), str(WXS), str(frag.absolute())], cwd=files_root)
    if not msi.is_file():
        raise BuildError(f"wixl reported success but wrote no {msi}")
    return msi


def _run(argv: Sequence[str], cwd: Path | None = None) -> None:
    # argv is this script's own: pip, wixl and paths it built.
    done = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=cwd)  # noqa: S603
    # wixl prints GLib warnings for attributes it ignores; only real errors fail the build.
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip()
        raise BuildError(f"{Path(argv[0]).name} failed ({done.returncode}): {output[-2000:]}")


def main(argv: Sequence[str] | None = None) -> int:
    """Build the MSI from the command line."""
    parser = argparse.ArgumentParser(prog="python -m installer.windows.build_msi",
                                     description="Build tillsync-<version>.msi with wixl.")
    parser.add_argument("--out", type=Path, default=Path("dist"), help="output directory")
    parser.add_argument("--wheelhouse", type=Path, default=None,
                        help="keep the Windows wheels here (reused by later builds; an"
                             " offline build works when every wheel is already in it)")
    parser.add_argument("--stage", type=Path, default=None,
                        help="lay the files out here and keep them (default: a temp dir)")
    args = parser.parse_args(argv)
    try:
        msi = build(args.out, wheelhouse=args.wheelhouse, stage_dir=args.stage)
    except BuildError as err:
        print(f"build_msi: {err}", file=sys.stderr)
        return 1
    print(msi)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
