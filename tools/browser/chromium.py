"""Obtain a headless Chromium for the browser tests without installing anything system-wide.

Order tried by :func:`obtain`:

1. ``LUMINA_CHROMIUM``: the path of a Chromium / Chrome / headless-shell executable to use as is.
2. Debian's ``chromium-headless-shell`` package and the shared libraries this machine lacks for it,
   fetched with ``apt-get download`` (no root needed) and unpacked with ``dpkg-deb -x`` under
   ``<repo>/.cache/browser/``; later runs reuse that folder without touching the network. If the
   machine's apt lists are missing or stale, a private ``apt-get update`` into the cache folder is
   tried once (the system's lists are never written).

(Playwright's own ``playwright install chromium`` download is not used: its CDN is not one of the
package registries this project's machines reach.)

Run as a script to fetch (or find) the browser and print its path::

    .venv/bin/python tools/browser/chromium.py
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO / ".cache" / "browser"
PACKAGE = "chromium-headless-shell"
EXECUTABLE = Path("usr/lib/chromium/chromium-headless-shell")
# chromium-common carries icudtl.dat, the V8 snapshots and resources.pak the shell needs
ALWAYS = (PACKAGE, "chromium-common")
SKIP_PACKAGES = {"xdg-utils"}  # shell scripts for desktop integration, not needed headless
# fail fast without a network instead of apt's default two-minute timeouts and retries
NETWORK = ["-o", "Acquire::http::Timeout=20", "-o", "Acquire::https::Timeout=20", "-o", "Acquire::Retries=1"]


class BrowserUnavailable(Exception):
    """No browser could be obtained; the message says why (tests skip with it)."""


@dataclass
class Browser:
    executable: Path
    env: dict[str, str] = field(default_factory=dict)  # extra environment (LD_LIBRARY_PATH)
    source: str = ""
    version: str = ""


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "LC_ALL": "C"}
    )


def _tail(out: subprocess.CompletedProcess) -> str:
    text = (out.stderr or out.stdout or "").strip().splitlines()
    errors = [line for line in text if line.startswith(("E:", "dpkg-deb:"))] or text
    return " / ".join(errors[-3:])


def _library_dirs(root: Path) -> list[str]:
    """Folders of the unpacked tree holding shared libraries (multiarch dirs and their subdirs)."""
    chromium = root / EXECUTABLE.parent
    dirs = {p.parent for p in root.rglob("*.so*") if p.is_file() or p.is_symlink()}
    return sorted(str(d) for d in dirs if d != chromium)


def _env_for(root: Path) -> dict[str, str]:
    dirs = _library_dirs(root)
    old = os.environ.get("LD_LIBRARY_PATH")
    return {"LD_LIBRARY_PATH": os.pathsep.join(dirs + ([old] if old else []))} if dirs else {}


def missing_libraries(executable: Path, env: dict[str, str]) -> list[str]:
    """Shared libraries ``ldd`` cannot resolve for ``executable`` under ``env`` (empty if none)."""
    if shutil.which("ldd") is None:
        return []
    out = subprocess.run(
        ["ldd", str(executable)], capture_output=True, text=True, env={**os.environ, **env}, timeout=60
    )
    return [line.split("=>")[0].strip() for line in out.stdout.splitlines() if "not found" in line]


def _apt_options(lists: Path | None) -> list[str]:
    if lists is None:
        return []
    return [
        "-o",
        f"Dir::State::Lists={lists / 'lists'}",
        "-o",
        f"Dir::Cache={lists / 'cache'}",
        "-o",
        "Debug::NoLocking=1",
    ]


def _packages_to_fetch(options: list[str]) -> list[str]:
    """The shell, chromium-common and every dependency this machine does not have installed."""
    simulate = ["-o", "Debug::NoLocking=1", "-s", "install", "--no-install-recommends", PACKAGE]
    out = _run(["apt-get", *options, *simulate], timeout=120)
    if out.returncode != 0:
        raise BrowserUnavailable(f"apt-get cannot resolve {PACKAGE}: {_tail(out)}")
    wanted = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("Inst ")]
    return list(dict.fromkeys([*ALWAYS, *(p for p in wanted if p not in SKIP_PACKAGES)]))


def _download(packages: list[str], options: list[str], into: Path) -> list[Path]:
    out = _run(["apt-get", *options, *NETWORK, "-q", "download", *packages], cwd=into, timeout=600)
    if out.returncode != 0:
        raise BrowserUnavailable(f"apt-get download failed: {_tail(out)}")
    debs = sorted(into.glob("*.deb"))
    if not any(d.name.startswith(PACKAGE + "_") for d in debs):
        raise BrowserUnavailable(f"apt-get download gave no {PACKAGE} package")
    return debs


def _private_update(cache: Path) -> list[str]:
    apt = cache / "apt"
    for sub in ("lists/partial", "cache/archives/partial"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    options = _apt_options(apt)
    out = _run(["apt-get", *options, *NETWORK, "-o", "APT::Sandbox::User=root", "-q", "update"], timeout=300)
    if out.returncode != 0:
        raise BrowserUnavailable(f"apt-get update (private lists) failed: {_tail(out)}")
    return options


def _fetch_debian(cache: Path) -> Browser:
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise BrowserUnavailable(f"{tool} not found (not a Debian-family machine)")
    work = Path(tempfile.mkdtemp(prefix="fetch-", dir=cache))
    try:
        debs_dir, root = work / "debs", work / "root"
        debs_dir.mkdir()
        try:  # the machine's own apt lists first, then private fresh ones
            options: list[str] = []
            debs = _download(_packages_to_fetch(options), options, debs_dir)
        except BrowserUnavailable as first:
            try:
                options = _private_update(cache)
                for stale in debs_dir.glob("*.deb"):
                    stale.unlink()
                debs = _download(_packages_to_fetch(options), options, debs_dir)
            except BrowserUnavailable as second:
                raise BrowserUnavailable(f"{first}; then {second}") from None
        version = ""
        for deb in debs:
            out = _run(["dpkg-deb", "-x", str(deb), str(root)], timeout=300)
            if out.returncode != 0:
                raise BrowserUnavailable(f"dpkg-deb -x {deb.name} failed: {_tail(out)}")
            if deb.name.startswith(PACKAGE + "_"):
                version = deb.name.split("_")[1]
        shutil.rmtree(debs_dir)
        (root / "fetched.json").write_text(
            json.dumps({"package": PACKAGE, "version": version, "debs": [d.name for d in debs]}, indent=1)
        )
        final = cache / "debian"
        if final.exists():
            shutil.rmtree(final)
        root.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _cached(cache)  # type: ignore[return-value]


def _cached(cache: Path) -> Browser | None:
    root = cache / "debian"
    stamp, executable = root / "fetched.json", root / EXECUTABLE
    if not (stamp.is_file() and executable.is_file()):
        return None
    info = json.loads(stamp.read_text())
    return Browser(executable, _env_for(root), source=f"debian {PACKAGE}", version=info.get("version", ""))


@contextlib.contextmanager
def _locked(cache: Path):
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def obtain(cache: Path = DEFAULT_CACHE) -> Browser:
    """A usable headless Chromium, fetching it into ``cache`` on first use; raises BrowserUnavailable."""
    explicit = os.environ.get("LUMINA_CHROMIUM")
    if explicit:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BrowserUnavailable(f"LUMINA_CHROMIUM={explicit} is not an executable file")
        return Browser(path, source="LUMINA_CHROMIUM")
    if not sys.platform.startswith("linux"):
        raise BrowserUnavailable(f"no browser fetch for {sys.platform}; set LUMINA_CHROMIUM")
    with _locked(cache):
        browser = _cached(cache) or _fetch_debian(cache)
    missing = missing_libraries(browser.executable, browser.env)
    if missing:
        raise BrowserUnavailable(
            f"{browser.executable} lacks shared libraries {', '.join(missing)} "
            f"(delete {cache} to fetch again)"
        )
    return browser


def main() -> int:
    start = time.perf_counter()
    try:
        browser = obtain()
    except BrowserUnavailable as exc:
        print(f"no browser: {exc}", file=sys.stderr)
        return 1
    print(browser.executable)
    print(
        f"{browser.source} {browser.version} in {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
