"""Real photographs bundled inside installed Python wheels: scikit-image's ``skimage/data`` and
scikit-learn's ``sklearn/datasets/images``. No network, no apt: they are on disk wherever the
project's dependencies are installed.

Each image's license and credit are listed here, taken from the package's own provenance notes
(the docstring of the ``skimage.data`` loader, scikit-learn's ``images/README.txt``). The first
line of a scikit-image loader's docstring is a human-written description ("Chelsea the cat."),
written beside the image as English alt text; scikit-learn's two images come without one.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from common.errors import ConfigError
from data_tools.debian import SourceUnavailable
from data_tools.imagefiles import (
    PHOTO_MAX_SIDE,
    PHOTO_QUALITY,
    SOURCE_KEYS,
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

# Bumped when rendering changes, so files built by an older version are redone, not skipped.
RENDER_VERSION = 1


@dataclass(frozen=True)
class BundledPackage:
    """A wheel that ships images: its distribution name and the module folder holding them."""

    distribution: str
    module: str  # importable package whose folder holds the files
    license_notes: str | None = None  # a provenance file in that folder, copied into LICENSE


@dataclass(frozen=True)
class BundledImage:
    package: str  # distribution name
    filename: str
    license: str
    credit: str
    describe_with: str | None = None  # skimage.data loader whose docstring describes the image


PACKAGES = {
    "scikit-image": BundledPackage("scikit-image", "skimage.data"),
    "scikit-learn": BundledPackage("scikit-learn", "sklearn.datasets.images", "README.txt"),
}

# The photographs among the bundled files, with the license each package states for it.
IMAGES: tuple[BundledImage, ...] = (
    BundledImage("scikit-image", "astronaut.png", "public domain", "NASA", "astronaut"),
    BundledImage("scikit-image", "camera.png", "CC0", "Lav Varshney", "camera"),
    BundledImage("scikit-image", "chelsea.png", "CC0", "Stefan van der Walt", "chelsea"),
    BundledImage("scikit-image", "coffee.png", "CC0", "Rachel Michetti", "coffee"),
    BundledImage("scikit-image", "coins.png", "no known copyright restrictions", "Brooklyn Museum", "coins"),
    BundledImage("scikit-image", "hubble_deep_field.jpg", "public domain", "NASA", "hubble_deep_field"),
    BundledImage(
        "scikit-image",
        "ihc.png",
        "no known copyright restrictions",
        "Center for Microscopy And Molecular Imaging (CMMI)",
        "immunohistochemistry",
    ),
    BundledImage("scikit-image", "retina.jpg", "CC0-1.0", "Mikael Häggström", "retina"),
    BundledImage("scikit-image", "rocket.jpg", "public domain", "SpaceX", "rocket"),
    BundledImage("scikit-image", "brick.png", "CC0", "CC0Textures", "brick"),
    BundledImage("scikit-image", "grass.png", "CC0", "linolafett (DeviantArt)", "grass"),
    BundledImage("scikit-image", "gravel.png", "CC0", "CC0Textures", "gravel"),
    BundledImage("scikit-image", "clock_motion.png", "public domain", "Stefan van der Walt", "clock"),
    BundledImage("scikit-image", "cell.png", "CC0", "Paul Müller et al.", "cell"),
    BundledImage("scikit-learn", "china.jpg", "CC-BY-2.0", "danielbuechele (Flickr)"),
    BundledImage("scikit-learn", "flower.jpg", "CC-BY-2.0", "vultilion (Flickr)"),
)


def package_folder(package: BundledPackage) -> Path:
    """The folder of an installed package's images; :class:`SourceUnavailable` when not installed."""
    try:
        spec = importlib.util.find_spec(package.module)
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise SourceUnavailable(
            f"{package.distribution} is not installed (pip install {package.distribution})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def loader_doc(image: BundledImage) -> str | None:
    """The docstring of the ``skimage.data`` loader that describes the image (its provenance)."""
    if image.describe_with is None:
        return None
    import skimage.data

    loader = getattr(skimage.data, image.describe_with, None)
    doc = inspect.getdoc(loader) if loader is not None else None
    return doc.strip() if doc and doc.strip() else None


def description(doc: str | None) -> str | None:
    """The first line of a loader's docstring (:func:`loader_doc`): a human-written alt text."""
    return doc.splitlines()[0].strip() or None if doc else None


def build_bundled(out_dir: str | Path, packages: Sequence[str] | None = None) -> Path:
    """The listed photographs of the installed ``packages`` (default: all known) as
    ``bundled_<nnnn>.jpg`` (RGB, at most 768 px, JPEG quality 90) with a ``.txt`` alt text where
    the package describes the image, plus ``bundled.jsonl``, ``SOURCES.md`` and ``LICENSE``.
    A package that is not installed is skipped with a warning; none at all raises
    :class:`SourceUnavailable`. Returns ``out_dir``."""
    wanted = list(PACKAGES if packages is None else packages)
    unknown = sorted(set(wanted) - set(PACKAGES))
    if unknown:
        raise ConfigError(
            f"unknown bundled-image package(s) {', '.join(unknown)} (known: {', '.join(PACKAGES)})"
        )
    folders: dict[str, Path] = {}
    failures = []
    for name in wanted:
        try:
            folders[name] = package_folder(PACKAGES[name])
        except SourceUnavailable as exc:
            logger.warning("skipping bundled images of %s: %s", name, exc)
            failures.append(str(exc))
    chosen = [
        img for img in IMAGES if img.package in folders and (folders[img.package] / img.filename).is_file()
    ]
    for img in IMAGES:
        if img.package in folders and img not in chosen:
            logger.warning(
                "skipping %s: %s is not in this %s release", img.filename, img.filename, img.package
            )
    if not chosen:
        reasons = "; ".join(failures) or "none of the listed images is installed"
        raise SourceUnavailable(f"no bundled images ({reasons})")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous = read_records(out / "bundled.jsonl")
    versions = {name: importlib.metadata.version(name) for name in folders}
    records, keep, docs = [], set(), {}
    for i, img in enumerate(tqdm(chosen, desc="bundled images", leave=False)):
        path, txt = out / f"bundled_{i:04d}.jpg", out / f"bundled_{i:04d}.txt"
        module_path = PACKAGES[img.package].module.replace(".", "/")
        docs[path.name] = loader_doc(img)
        alt_text = description(docs[path.name])
        record = {
            "file": path.name, "source": "wheel", "package": img.package, "version": versions[img.package],
            "original_path": f"{module_path}/{img.filename}", "license": img.license, "credit": img.credit,
            "alt_text": alt_text, "render_version": RENDER_VERSION,
        }  # fmt: skip
        prev = previous.get(path.name)
        files = (path, txt) if alt_text else (path,)
        if is_current(prev, record, files, (*SOURCE_KEYS, "alt_text")):
            record["width"], record["height"] = prev["width"], prev["height"]
        else:
            image = load_rgb(folders[img.package] / img.filename, PHOTO_MAX_SIDE, photo=True)
            write_atomic(path, encode(image, "JPEG"))
            record["width"], record["height"] = image.size
        if alt_text:
            write_if_changed(txt, (alt_text + "\n").encode())
        keep.update(f.name for f in files)
        records.append(record)
    remove_stale(out, r"bundled_\d{4,}\.(jpg|txt)", keep)
    write_if_changed(out / "bundled.jsonl", jsonl(records))
    write_if_changed(out / "SOURCES.md", _sources(records).encode())
    write_if_changed(out / "LICENSE", _license_text(records, folders, docs).encode())
    return out


def _sources(records: list[dict]) -> str:
    used = sorted({(r["package"], r["version"]) for r in records})
    rows = "".join(
        f"| {r['file']} | {r['package']} {r['version']} | `{r['original_path']}` | {r['license']} | "
        f"{r['credit']} | {r['alt_text'] or '—'} |\n"
        for r in records
    )
    return (
        "# Photographs bundled in Python wheels\n\n"
        f"{len(records)} photographs shipped inside installed wheels "
        + ", ".join(f"`{name}=={version}`" for name, version in used)
        + f", downscaled to at most {PHOTO_MAX_SIDE} px (JPEG quality {PHOTO_QUALITY}). The alt text is the "
        "first line of the image's description in scikit-image (`skimage.data` docstrings); scikit-learn's "
        "images have none.\n\n"
        "| image | package | path in the wheel | license | credit | alt text |\n|---|---|---|---|---|---|\n"
        + rows
    )


def _license_text(records: list[dict], folders: dict[str, Path], docs: dict[str, str | None]) -> str:
    parts = [
        "Licenses of the images in this folder, as stated by the packages that ship them.\n\n"
        + "".join(
            f"{r['file']}: {r['license']}, {r['credit']} ({r['package']} `{r['original_path']}`)\n"
            for r in records
        )
    ]
    for r in records:
        if docs.get(r["file"]):
            where = f"the {r['package']} description of `{r['original_path']}`"
            parts.append(f"{r['file']}: {where}, unchanged:\n\n{docs[r['file']]}\n")
    for name in sorted({r["package"] for r in records}):
        notes = PACKAGES[name].license_notes
        if notes and (folders[name] / notes).is_file():
            text = (folders[name] / notes).read_text(encoding="utf-8", errors="replace").rstrip()
            parts.append(f"{name}: {PACKAGES[name].module.replace('.', '/')}/{notes}, unchanged:\n\n{text}\n")
    return ("\n" + "=" * 78 + "\n\n").join(parts)
