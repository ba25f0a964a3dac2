"""Tux Paint stamps (Debian ``tuxpaint-stamps-default``, GPL-2) for the offline sample dataset:
clip-art with a human-written description beside each stamp (first line English, then
``locale.utf8=translation`` lines), which the ``alt-text`` recaption backend reads.

The package is fetched and cached by :mod:`data_tools.debian`; outputs are deterministic for a seed
and rebuilding skips files that are already up to date.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from data_tools.debian import (
    SourceUnavailable,
    copyright_field,
    dep5_lookup,
    fetch_debian_package,
    license_text,
    package_info,
    parse_dep5,
)
from data_tools.imagefiles import (
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

TUXPAINT_PACKAGE = "tuxpaint-stamps-default"
STAMPS_DIR = "usr/share/tuxpaint/stamps"
STAMP_MAX_SIDE = 512
# Bumped when rendering changes, so files built by an older version are redone, not skipped.
RENDER_VERSION = 1
_ZH_LINE = re.compile(r"^(?P<locale>zh_(?:CN|TW))(?:\.[\w-]+)?=(?P<text>.*)$")
_LOCALE_LINE = re.compile(r"^[A-Za-z]{2,3}(?:_[A-Za-z]{2,4})?(?:@\w+)?(?:\.[\w-]+)?=")
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


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
    chosen = pick_sample(candidates, limit, seed, "tux paint stamps")
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
    upstream = ", ".join(copyright_field(copyright_text, f) for f in ("Upstream-Name", "Source"))
    rows = "".join(f"| {r['file']} | {r['caption_file']} | `{r['original_path']}` |\n" for r in records)
    sources = (
        "# Tux Paint stamps\n\n"
        f"{len(records)} stamps from the Debian package `{pkg.name}` version `{pkg.version}` "
        f"(.deb sha256 `{pkg.sha256}`), picked with seed {seed} among the {len(candidates)} stamps "
        f"whose description has a Chinese line (and with a short side of at least {min_side} px and an "
        f"aspect ratio of at most {max_aspect:g}), composited onto white and downscaled to at most "
        f"{STAMP_MAX_SIDE} px.\n\n"
        f"- Upstream: {upstream}\n"
        f"- Copyright: {records[0]['copyright']}\n"
        f"- License: {records[0]['license']} (see `LICENSE`: the package's copyright file, unchanged)\n"
        "- Each `tuxpaint_<nnnn>.txt` is the stamp's own description file, unchanged: first line "
        "English, then `locale.utf8=translation` lines.\n"
        f"- Get the package again: `apt-get download {pkg.name}={pkg.version}`\n\n"
        "| image | description | path in the package |\n|---|---|---|\n" + rows
    )
    write_if_changed(out / "SOURCES.md", sources.encode())
    write_if_changed(out / "LICENSE", license_text([pkg]))
    return out
