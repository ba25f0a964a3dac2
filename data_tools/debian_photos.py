"""Photographs shipped in Debian wallpaper and documentation packages, for the offline sample dataset,
with each file's license and copyright holder taken from the package's machine-readable ``copyright``
file; no captions.

The packages are fetched and cached by :mod:`data_tools.debian` (one that cannot be fetched is skipped
with a warning); outputs are deterministic for a seed and rebuilding skips files that are already up
to date.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from common.errors import ConfigError
from data_tools.debian import (
    DebianPackage,
    SourceUnavailable,
    dep5_lookup,
    fetch_debian_package,
    license_text,
    package_info,
    parse_dep5,
)
from data_tools.imagefiles import (
    PHOTO_MAX_SIDE,
    PHOTO_QUALITY,
    encode,
    is_current,
    jsonl,
    load_rgb,
    pick_sample,
    read_records,
    remove_stale,
    write_atomic,
    write_if_changed,
)

logger = logging.getLogger(__name__)

# Bumped when rendering changes, so files built by an older version are redone, not skipped.
RENDER_VERSION = 1


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


def _holders(record: dict) -> str:
    """The copyright holders for a table cell: long lists are cut (``LICENSE`` has them all)."""
    holders = record["copyright"].split("; ")
    return "; ".join(holders) if len(holders) <= 2 else f"{holders[0]} and others"


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
    chosen = pick_sample(candidates, limit, seed, "photos")
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
    write_if_changed(out / "LICENSE", license_text(used))
    return out
