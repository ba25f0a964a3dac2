"""Debian packages fetched with ``apt-get download`` and extracted with ``dpkg-deb -x`` (no root install
needed), and the licenses in their machine-readable (DEP-5) ``copyright`` files.

Packages are cached (downloaded and extracted once, under a per-package lock); any failure (no apt-get,
unknown package, mirror unreachable) is a one-line :class:`SourceUnavailable`. The sample-data builders
that use them are :mod:`data_tools.tuxpaint` and :mod:`data_tools.debian_photos`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from common.errors import LuminaError
from data_tools.imagefiles import write_atomic

logger = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 1800
_PACKAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")  # Debian policy 5.6.1


class SourceUnavailable(LuminaError):
    """A Debian package could not be fetched (no apt-get, unknown package, mirror unreachable)."""


@dataclass(frozen=True)
class DebianPackage:
    """A downloaded and extracted package: ``root`` is the extracted file system tree."""

    name: str
    version: str
    architecture: str
    deb: str  # file name of the downloaded .deb
    sha256: str  # of the .deb, as downloaded (apt verified it against the signed Release)
    root: Path

    def copyright_file(self) -> Path:
        return self.root / "usr/share/doc" / self.name / "copyright"


# --------------------------------------------------------------------------- fetching


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _apt_failure(stderr: str, returncode: int) -> str:
    """The reason an ``apt-get download`` failed, as one line."""
    errors = [line[3:].strip() for line in stderr.splitlines() if line.startswith("E: ")]
    if any(e.startswith(("Unable to locate package", "Couldn't find any package")) for e in errors):
        return "no such package in the apt lists (check the name, or run `apt-get update`)"
    for err in errors:
        if err.startswith("Failed to fetch"):
            # "Failed to fetch URL  reason": the reason is what a user can act on.
            parts = err.split(None, 3)
            return "mirror unreachable: " + _one_line(parts[3] if len(parts) > 3 else err)
    return _one_line(errors[-1]) if errors else f"apt-get exited with status {returncode}"


def _run(cmd: list[str], *, what: str, cwd: Path | None = None, timeout: float = 600) -> str:
    """Run a command with C-locale messages; any failure is a one-line SourceUnavailable."""
    env = {**os.environ, "LC_ALL": "C"}
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise SourceUnavailable(f"{what}: {Path(cmd[0]).name} timed out after {timeout:.0f} s") from exc
    except OSError as exc:
        raise SourceUnavailable(f"{what}: cannot run {Path(cmd[0]).name}: {exc.strerror}") from exc
    if proc.returncode != 0:
        if Path(cmd[0]).name == "apt-get":
            reason = _apt_failure(proc.stderr, proc.returncode)
        else:
            reason = _one_line(proc.stderr or proc.stdout or f"exit status {proc.returncode}")
        raise SourceUnavailable(f"{what}: {reason}")
    return proc.stdout


def _tool(name: str, what: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SourceUnavailable(f"{what}: {name} not found (a Debian/Ubuntu system with apt is needed)")
    return path


def package_info(root: str | Path) -> DebianPackage:
    """Name, version and checksum of a package extracted by :func:`fetch_debian_package`."""
    root = Path(root)
    meta = root.parent / "package.json"
    if not meta.is_file():
        raise SourceUnavailable(f"{root} was not extracted by fetch_debian_package (no {meta.name})")
    fields = json.loads(meta.read_text(encoding="utf-8"))
    keys = ("name", "version", "architecture", "deb", "sha256")
    return DebianPackage(root=root, **{k: fields[k] for k in keys})


def fetch_debian_package(name: str, cache_dir: str | Path) -> Path:
    """Download ``name`` with ``apt-get download`` into ``cache_dir`` and extract it, once;
    returns the extracted root (``cache_dir/<name>/root``). The .deb is removed after extraction
    (its checksum and version are kept in ``cache_dir/<name>/package.json``)."""
    what = f"cannot fetch Debian package {name!r}"
    if not _PACKAGE_NAME.match(name):
        raise SourceUnavailable(f"{what}: not a valid Debian package name")
    pkg_dir = Path(cache_dir).expanduser().resolve() / name
    root, meta = pkg_dir / "root", pkg_dir / "package.json"
    if meta.is_file() and root.is_dir():
        return root
    try:
        pkg_dir.mkdir(parents=True, exist_ok=True)
        return _fetch_locked(name, pkg_dir, what)
    except OSError as exc:  # unwritable cache, disk full: one line, no traceback
        raise SourceUnavailable(f"{what}: {exc.strerror or exc} ({exc.filename or pkg_dir})") from exc


def _fetch_locked(name: str, pkg_dir: Path, what: str) -> Path:
    root, meta = pkg_dir / "root", pkg_dir / "package.json"
    with open(pkg_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be fetching the same package
        if meta.is_file() and root.is_dir():
            return root
        apt_get, dpkg_deb = _tool("apt-get", what), _tool("dpkg-deb", what)
        for stale in [*pkg_dir.glob(".download-*"), *pkg_dir.glob(".extract-*"), root]:
            shutil.rmtree(stale, ignore_errors=True)  # leftovers of an interrupted fetch
        download = Path(tempfile.mkdtemp(prefix=".download-", dir=pkg_dir))
        try:
            start = time.perf_counter()
            logger.info("downloading Debian package %s", name)
            _run([apt_get, "download", name], what=what, cwd=download, timeout=DOWNLOAD_TIMEOUT_S)
            debs = sorted(download.glob("*.deb"))
            if len(debs) != 1:
                raise SourceUnavailable(f"{what}: apt-get download left {len(debs)} .deb files")
            deb = debs[0]
            fields = _run([dpkg_deb, "--show", "--showformat=${Package}\\t${Version}\\t${Architecture}",
                           str(deb)], what=what).split("\t")  # fmt: skip
            size_mb = deb.stat().st_size / 1e6
            logger.info("extracting %s (%.0f MB, downloaded in %.1f s)", deb.name, size_mb,
                        time.perf_counter() - start)  # fmt: skip
            extract = Path(tempfile.mkdtemp(prefix=".extract-", dir=pkg_dir))
            _run([dpkg_deb, "-x", str(deb), str(extract)], what=what, timeout=DOWNLOAD_TIMEOUT_S)
            os.replace(extract, root)
            with open(deb, "rb") as fh:
                sha256 = hashlib.file_digest(fh, "sha256").hexdigest()
            info = {"name": fields[0], "version": fields[1], "architecture": fields[2].strip(),
                    "deb": deb.name, "sha256": sha256}  # fmt: skip
            write_atomic(meta, (json.dumps(info, indent=1) + "\n").encode())
            logger.info("%s %s ready in %.1f s", name, info["version"], time.perf_counter() - start)
        finally:
            shutil.rmtree(download, ignore_errors=True)
    return root


# --------------------------------------------------------------------------- licenses


@dataclass(frozen=True)
class _Dep5Files:
    patterns: tuple[str, ...]
    copyright: str
    license: str


def parse_dep5(text: str) -> list[_Dep5Files]:
    """The ``Files:`` paragraphs of a machine-readable Debian copyright file (DEP-5)."""
    paragraphs: list[_Dep5Files] = []
    for block in re.split(r"\n[ \t]*\n", text):
        fields: dict[str, list[str]] = {}
        key = None
        for line in block.splitlines():
            if line.startswith("#"):
                continue
            if line[:1] in (" ", "\t"):
                if key is not None:
                    fields[key].append(line.strip())
            elif ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = [value.strip()]
        if "files" in fields and "license" in fields:
            paragraphs.append(_Dep5Files(
                patterns=tuple(" ".join(fields["files"]).split()),
                copyright="; ".join(c for c in fields.get("copyright", []) if c and c != "."),
                license=fields["license"][0],
            ))  # fmt: skip
    return paragraphs


def _dep5_match(pattern: str, path: str) -> bool:
    # DEP-5 globs: only * (any characters, "/" included) and ?; "[" is literal.
    return fnmatchcase(path, pattern.replace("[", "[[]"))


def dep5_lookup(paragraphs: Sequence[_Dep5Files], path: str) -> tuple[str, str]:
    """(license, copyright) of an upstream source path; the last matching paragraph wins."""
    match = None
    for para in paragraphs:
        if any(_dep5_match(p, path) for p in para.patterns):
            match = para
    return (match.license, match.copyright) if match else ("unknown", "unknown")


def license_text(packages: Sequence[DebianPackage]) -> bytes:
    """A ``LICENSE`` file for files taken from ``packages``: each package's copyright file, unchanged."""
    parts = []
    for pkg in packages:
        parts.append(
            f"Files in this folder taken from the Debian package {pkg.name} {pkg.version} keep its\n"
            f"licenses. Its copyright file (/usr/share/doc/{pkg.name}/copyright) follows unchanged.\n\n"
            + pkg.copyright_file().read_text(encoding="utf-8", errors="replace").rstrip()
            + "\n"
        )
    return ("\n" + "=" * 78 + "\n\n").join(parts).encode()


def copyright_field(copyright_text: str, field: str) -> str:
    """A header field (``Upstream-Name``, ``Source``...) of a DEP-5 copyright file, or ``"unknown"``."""
    match = re.search(rf"^{field}:[ \t]*(.+)$", copyright_text, flags=re.MULTILINE)
    return match.group(1).strip() if match else "unknown"
