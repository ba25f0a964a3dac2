"""Real images from Debian packages, fetched with ``apt-get download`` (no root install needed).

Two sources for the offline sample dataset:

* Tux Paint stamps (``tuxpaint-stamps-default``, GPL-2): clip-art with a human-written description
  beside each stamp (first line English, then ``locale.utf8=translation`` lines), which the
  ``alt-text`` recaption backend reads.
* Photographs shipped in wallpaper and documentation packages, with each file's license and
  copyright holder taken from the package's machine-readable ``copyright`` file; no captions.

Packages are cached (downloaded and extracted once); outputs are deterministic for a seed and
rebuilding skips files that are already up to date.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from common.errors import ConfigError, LuminaError
from data_tools.imagefiles import (
    PHOTO_MAX_SIDE,
    PHOTO_QUALITY,
    encode,
    is_current,
    jsonl,
    load_rgb,
    read_records,
    remove_stale,
    write_atomic,
    write_if_changed,
)

logger = logging.getLogger(__name__)

TUXPAINT_PACKAGE = "tuxpaint-stamps-default"
STAMPS_DIR = "usr/share/tuxpaint/stamps"
STAMP_MAX_SIDE = 512
# Bumped when rendering changes, so files built by an older version are redone, not skipped.
RENDER_VERSION = 1
DOWNLOAD_TIMEOUT_S = 1800
_PACKAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")  # Debian policy 5.6.1
_ZH_LINE = re.compile(r"^(?P<locale>zh_(?:CN|TW))(?:\.[\w-]+)?=(?P<text>.*)$")
_LOCALE_LINE = re.compile(r"^[A-Za-z]{2,3}(?:_[A-Za-z]{2,4})?(?:@\w+)?(?:\.[\w-]+)?=")
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


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


# --------------------------------------------------------------------------- images


# --------------------------------------------------------------------------- outputs


def _license_text(packages: Sequence[DebianPackage]) -> bytes:
    parts = []
    for pkg in packages:
        parts.append(
            f"Files in this folder taken from the Debian package {pkg.name} {pkg.version} keep its\n"
            f"licenses. Its copyright file (/usr/share/doc/{pkg.name}/copyright) follows unchanged.\n\n"
            + pkg.copyright_file().read_text(encoding="utf-8", errors="replace").rstrip()
            + "\n"
        )
    return ("\n" + "=" * 78 + "\n\n").join(parts).encode()


def _header(copyright_text: str, field: str) -> str:
    match = re.search(rf"^{field}:[ \t]*(.+)$", copyright_text, flags=re.MULTILINE)
    return match.group(1).strip() if match else "unknown"


def _holders(record: dict) -> str:
    """The copyright holders for a table cell: long lists are cut (``LICENSE`` has them all)."""
    holders = record["copyright"].split("; ")
    return "; ".join(holders) if len(holders) <= 2 else f"{holders[0]} and others"


def _sample(items: list, limit: int, seed: int, what: str) -> list:
    if limit < 1:
        raise ConfigError(f"limit must be at least 1, got {limit}")
    if limit > len(items):
        logger.warning("%s: only %d available, taking all (limit %d)", what, len(items), limit)
    return random.Random(seed).sample(items, min(limit, len(items)))


# --------------------------------------------------------------------------- Tux Paint


@dataclass(frozen=True)
class _Stamp:
    rel: str  # path of the PNG below the stamps folder
    english: str
    zh_locale: str
    zh: str


def _stamp_description(txt: Path) -> tuple[str, str, str] | None:
    """(English, zh locale, Chinese) of a stamp's description, or None without both."""
    try:
        lines = txt.read_text(encoding="utf-8").lstrip("\ufeff").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    english = lines[0].strip() if lines else ""
    if not english or _LOCALE_LINE.match(english):
        return None
    found: dict[str, str] = {}
    for line in lines[1:]:
        match = _ZH_LINE.match(line.strip())
        if match and _CJK.search(match["text"]):
            found.setdefault(match["locale"], match["text"].strip())
    for locale in ("zh_CN", "zh_TW"):
        if locale in found:
            return english, locale, found[locale]
    return None


def _fits(path: Path, min_side: int, max_aspect: float) -> bool:
    """Whether the stamp, once downscaled, passes ingest's size and aspect filters."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, Image.DecompressionBombError):
        return False
    scale = min(1.0, STAMP_MAX_SIDE / max(width, height, 1))
    short = min(width, height)
    return round(short * scale) >= min_side and short > 0 and max(width, height) / short <= max_aspect


def tuxpaint_candidates(stamps_dir: Path, min_side: int = 32, max_aspect: float = 4.0) -> list[_Stamp]:
    """Stamps (sorted by path) whose description has an English first line and a Chinese line and
    that ingest would keep (short side at least ``min_side`` px, aspect at most ``max_aspect``)."""
    out = []
    for png in sorted(stamps_dir.rglob("*.png"), key=lambda p: p.relative_to(stamps_dir).as_posix()):
        described = _stamp_description(png.with_suffix(".txt"))
        if described and _fits(png, min_side, max_aspect):
            out.append(_Stamp(png.relative_to(stamps_dir).as_posix(), *described))
    return out


def build_tuxpaint(
    out_dir: str | Path,
    cache_dir: str | Path,
    limit: int = 64,
    seed: int = 0,
    min_side: int = 32,
    max_aspect: float = 4.0,
) -> Path:
    """``limit`` Tux Paint stamps on white as ``tuxpaint_<nnnn>.png`` (RGB, at most 512 px), each
    with its description copied unchanged to ``tuxpaint_<nnnn>.txt``, plus ``tuxpaint.jsonl``,
    ``SOURCES.md`` and ``LICENSE``. Stamps that ingest would drop (short side under ``min_side``,
    aspect over ``max_aspect``; its defaults) are not picked. Returns ``out_dir``."""
    root = fetch_debian_package(TUXPAINT_PACKAGE, cache_dir)
    pkg = package_info(root)
    stamps_dir = root / STAMPS_DIR
    candidates = tuxpaint_candidates(stamps_dir, min_side, max_aspect) if stamps_dir.is_dir() else []
    if not candidates:
        raise SourceUnavailable(f"{TUXPAINT_PACKAGE} {pkg.version} has no stamps with Chinese descriptions")
    chosen = _sample(candidates, limit, seed, "tux paint stamps")
    paragraphs = parse_dep5(pkg.copyright_file().read_text(encoding="utf-8", errors="replace"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous = read_records(out / "tuxpaint.jsonl")
    records, keep = [], set()
    for i, stamp in enumerate(tqdm(chosen, desc="tux paint stamps", leave=False)):
        png_path, txt_path = out / f"tuxpaint_{i:04d}.png", out / f"tuxpaint_{i:04d}.txt"
        license_name, holder = dep5_lookup(paragraphs, f"stamps/{stamp.rel}")
        record = {
            "file": png_path.name, "caption_file": txt_path.name, "source": "tuxpaint",
            "package": pkg.name, "version": pkg.version, "original_path": f"{STAMPS_DIR}/{stamp.rel}",
            "license": license_name, "copyright": holder, "render_version": RENDER_VERSION,
            "english": stamp.english, "zh_locale": stamp.zh_locale, "zh": stamp.zh,
        }  # fmt: skip
        prev = previous.get(png_path.name)
        if is_current(prev, record, (png_path, txt_path)):
            record["width"], record["height"] = prev["width"], prev["height"]
        else:
            src = stamps_dir / stamp.rel
            image = load_rgb(src, STAMP_MAX_SIDE, photo=False)
            write_atomic(png_path, encode(image, "PNG"))
            write_atomic(txt_path, src.with_suffix(".txt").read_bytes())
            record["width"], record["height"] = image.size
        records.append(record)
        keep |= {png_path.name, txt_path.name}
    remove_stale(out, r"tuxpaint_\d{4,}\.(png|txt)", keep)
    write_if_changed(out / "tuxpaint.jsonl", jsonl(records))
    copyright_text = pkg.copyright_file().read_text(encoding="utf-8", errors="replace")
    rows = "".join(f"| {r['file']} | {r['caption_file']} | `{r['original_path']}` |\n" for r in records)
    sources = (
        "# Tux Paint stamps\n\n"
        f"{len(records)} stamps from the Debian package `{pkg.name}` version `{pkg.version}` "
        f"(.deb sha256 `{pkg.sha256}`), picked with seed {seed} among the {len(candidates)} stamps "
        f"whose description has a Chinese line (and with a short side of at least {min_side} px and an "
        f"aspect ratio of at most {max_aspect:g}), composited onto white and downscaled to at most "
        f"{STAMP_MAX_SIDE} px.\n\n"
        f"- Upstream: {_header(copyright_text, 'Upstream-Name')}, {_header(copyright_text, 'Source')}\n"
        f"- Copyright: {records[0]['copyright']}\n"
        f"- License: {records[0]['license']} (see `LICENSE`: the package's copyright file, unchanged)\n"
        "- Each `tuxpaint_<nnnn>.txt` is the stamp's own description file, unchanged: first line "
        "English, then `locale.utf8=translation` lines.\n"
        f"- Get the package again: `apt-get download {pkg.name}={pkg.version}`\n\n"
        "| image | description | path in the package |\n|---|---|---|\n" + rows
    )
    write_if_changed(out / "SOURCES.md", sources.encode())
    write_if_changed(out / "LICENSE", _license_text([pkg]))
    return out


# --------------------------------------------------------------------------- photographs


@dataclass(frozen=True)
class PhotoSource:
    """Real photographs in a Debian package, picked by hand (no renders, drawings or patterns)."""

    package: str
    folder: str  # inside the package
    photos: tuple[str, ...]  # globs relative to ``folder``
    # (prefix below ``folder``, upstream prefix): maps a file to the path its copyright file uses.
    upstream: tuple[tuple[str, str], ...] = (("", ""),)

    def upstream_path(self, rel: str) -> str:
        for prefix, upstream in self.upstream:
            if rel.startswith(prefix):
                return upstream + rel[len(prefix) :]
        return rel


# Hand-checked: photographs only (the packages' abstract renders, patterns, drawings, paintings,
# calibration boards and photos of identifiable people are left out).
_LOMIRI_PHOTOS = """
    Bridge_by_Sander_Klootwijk Dragonfly_by_Bolly Picture_0B_by_freespace Picture_1A_by_freespace
    Wine_by_Jakkub_Mede aitzgorri_by_Aitzol_Berasategi free_by_Peter_Nerlich friends_by_Aitzol_Berasategi
    greentock_by_Peter_Nerlich life_by_Aitzol_Berasategi picosdeeuropa_by_Aitzol_Berasategi
    seeding_by_Clements_Engelhardt sunset_by_Aitzol_Berasategi
""".split()
_OPENCV_PHOTOS = """
    data/aero1.jpg data/aloeL.jpg data/apple.jpg data/board.jpg data/building.jpg data/butterfly.jpg
    data/fruits.jpg data/graf1.png data/home.jpg data/leuvenA.jpg data/orange.jpg data/rubberwhale1.png
    data/squirrel_cls.jpg data/stuff.jpg alphamat/input_images/plant.jpg hfs/data/000.jpg
    text/scenetext0[1-6].jpg
""".split()
PHOTO_SOURCES: tuple[PhotoSource, ...] = (
    PhotoSource("mate-backgrounds", "usr/share/backgrounds/mate", ("nature/*.jpg",)),
    PhotoSource(
        "lomiri-wallpapers-16.04",
        "usr/share/backgrounds",
        tuple(f"{n}.jpg" for n in _LOMIRI_PHOTOS),
        upstream=(("", "16.04/"),),
    ),
    PhotoSource(
        "opencv-doc",
        "usr/share/doc/opencv-doc/examples",
        tuple(_OPENCV_PHOTOS),
        upstream=(("data/", "samples/data/"), ("", "contrib/modules/")),
    ),
)
PHOTO_PACKAGES = tuple(s.package for s in PHOTO_SOURCES)


@dataclass(frozen=True)
class _Photo:
    package: DebianPackage
    source: PhotoSource
    rel: str  # below source.folder
    license: str
    copyright: str

    @property
    def original_path(self) -> str:
        return f"{self.source.folder}/{self.rel}"


def photo_candidates(source: PhotoSource, pkg: DebianPackage) -> list[_Photo]:
    """The package's listed photographs (sorted), each with its license from the copyright file."""
    folder = pkg.root / source.folder
    copyright_file = pkg.copyright_file()
    paragraphs = parse_dep5(copyright_file.read_text("utf-8", "replace")) if copyright_file.is_file() else []
    found = {p for pattern in source.photos for p in folder.glob(pattern) if p.is_file()}
    rels = sorted(p.relative_to(folder).as_posix() for p in found)
    out = []
    for rel in rels:
        license_name, holder = dep5_lookup(paragraphs, source.upstream_path(rel))
        out.append(_Photo(pkg, source, rel, license_name, holder))
    return out


def build_photos(out_dir: str | Path, cache_dir: str | Path, limit: int = 32, seed: int = 0,
                 packages: Sequence[str] | None = None) -> Path:  # fmt: skip
    """``limit`` photographs from the photo packages that can be fetched (the others are skipped
    with a warning) as ``photo_<nnnn>.jpg`` (RGB, at most 768 px, JPEG quality 90), plus
    ``photos.jsonl`` (file, package, original path, license, copyright), ``SOURCES.md`` and
    ``LICENSE``; no captions. Returns ``out_dir``."""
    wanted = list(PHOTO_PACKAGES if packages is None else packages)
    unknown = sorted(set(wanted) - set(PHOTO_PACKAGES))
    if unknown:
        known = ", ".join(PHOTO_PACKAGES)
        raise ConfigError(f"unknown photo package(s) {', '.join(unknown)} (known: {known})")
    candidates: list[_Photo] = []
    failures = []
    for source in (s for s in PHOTO_SOURCES if s.package in wanted):
        try:
            pkg = package_info(fetch_debian_package(source.package, cache_dir))
        except SourceUnavailable as exc:
            logger.warning("skipping photo package %s: %s", source.package, exc)
            failures.append(str(exc))
            continue
        found = photo_candidates(source, pkg)
        if not found:
            logger.warning("skipping photo package %s %s: none of its listed photos is there",
                           pkg.name, pkg.version)  # fmt: skip
        candidates += found
    if not candidates:
        reasons = "; ".join(failures) or "none of the listed photos was found"
        raise SourceUnavailable(f"no photo package could be used ({reasons})")
    chosen = _sample(candidates, limit, seed, "photos")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous = read_records(out / "photos.jsonl")
    records, keep = [], set()
    for i, photo in enumerate(tqdm(chosen, desc="photos", leave=False)):
        path = out / f"photo_{i:04d}.jpg"
        record = {
            "file": path.name, "source": "debian", "package": photo.package.name,
            "version": photo.package.version, "original_path": photo.original_path,
            "license": photo.license, "copyright": photo.copyright, "render_version": RENDER_VERSION,
        }  # fmt: skip
        prev = previous.get(path.name)
        if is_current(prev, record, (path,)):
            record["width"], record["height"] = prev["width"], prev["height"]
        else:
            image = load_rgb(photo.package.root / photo.original_path, PHOTO_MAX_SIDE, photo=True)
            write_atomic(path, encode(image, "JPEG"))
            record["width"], record["height"] = image.size
        records.append(record)
        keep.add(path.name)
    remove_stale(out, r"photo_\d{4,}\.jpg", keep)
    write_if_changed(out / "photos.jsonl", jsonl(records))
    used = sorted({p.package.name: p.package for p in chosen}.values(), key=lambda p: p.name)
    rows = "".join(
        f"| {r['file']} | {r['package']} | `{r['original_path']}` | {r['license']} | {_holders(r)} |\n"
        for r in records
    )
    sources = (
        "# Photographs\n\n"
        f"{len(records)} photographs picked with seed {seed} among {len(candidates)} hand-listed ones in "
        f"Debian packages, downscaled to at most {PHOTO_MAX_SIDE} px (JPEG quality {PHOTO_QUALITY}). "
        "No captions: caption them with a VLM.\n\n"
        + "".join(f"- `{p.name}` {p.version} (.deb sha256 `{p.sha256}`): "
                  f"`apt-get download {p.name}={p.version}`\n" for p in used)
        + "\nLicenses and copyright holders per file, from each package's copyright file "
        "(all of them, unchanged, in `LICENSE`):\n\n"
        "| image | package | path in the package | license | copyright |\n|---|---|---|---|---|\n" + rows
    )  # fmt: skip
    write_if_changed(out / "SOURCES.md", sources.encode())
    write_if_changed(out / "LICENSE", _license_text(used))
    return out
