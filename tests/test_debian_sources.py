"""Real-image sources from Debian packages (Tux Paint stamps, photographs).

These really download (once, into ``<repo>/.cache/debian``); they are skipped only when apt-get is
missing, the apt lists lack the packages, or the Debian mirror cannot be reached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from common.errors import ConfigError
from components.recaption.backends import alt_text_captions
from data_tools import debian, debian_photos, tuxpaint
from data_tools.debian import SourceUnavailable, dep5_lookup, fetch_debian_package, parse_dep5
from data_tools.debian_photos import PHOTO_PACKAGES, build_photos
from data_tools.tuxpaint import TUXPAINT_PACKAGE, build_tuxpaint

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "debian"
NEEDED = (TUXPAINT_PACKAGE, *PHOTO_PACKAGES)
_CJK = re.compile(r"[\u3400-\u9fff]")


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _apt_skip_reason() -> str | None:
    """Why these tests cannot fetch packages here, or None (a fast probe: no download)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return "apt-get/dpkg-deb not available (not a Debian/Ubuntu system)"
    missing = [n for n in NEEDED if not (CACHE / n / "package.json").is_file()]
    if not missing:
        return None  # warm cache: no network needed
    proc = subprocess.run(
        ["apt-get", "download", "--print-uris", *missing],
        capture_output=True, text=True, timeout=60, env={**os.environ, "LC_ALL": "C"},
    )  # fmt: skip
    uris = re.findall(r"^'([^']+)'", proc.stdout, flags=re.MULTILINE)
    if proc.returncode != 0 or not uris:
        return f"apt lists lack {', '.join(missing)} (run apt-get update): {proc.stderr.strip()[-200:]}"
    if uris[0].startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(urllib.request.Request(uris[0], method="HEAD"), timeout=10).close()
        except OSError as exc:
            return f"Debian mirror unreachable ({uris[0].split('/')[2]}): {exc}"
    return None


@pytest.fixture(scope="session")
def debian_cache() -> Path:
    reason = _apt_skip_reason()
    if reason:
        pytest.skip(reason)
    return CACHE


needs_apt = pytest.mark.skipif(shutil.which("apt-get") is None, reason="apt-get not available")


# --------------------------------------------------------------------------- errors (no download)


@needs_apt
@pytest.mark.parametrize("name", ["lumina-no-such-package-xyz", "-bogus", "Not A Name"])
def test_bogus_package_is_source_unavailable(name, tmp_path):
    with pytest.raises(SourceUnavailable) as info:
        fetch_debian_package(name, tmp_path)
    message = str(info.value)
    assert "\n" not in message and name in message
    assert not list(tmp_path.rglob("*.deb"))


@needs_apt
def test_bogus_package_message_is_actionable(tmp_path):
    with pytest.raises(SourceUnavailable, match=r"no such package .*apt-get update"):
        fetch_debian_package("lumina-no-such-package-xyz", tmp_path)


def test_missing_apt_get_is_source_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SourceUnavailable, match=r"'mate-backgrounds'.*apt-get not found"):
        fetch_debian_package("mate-backgrounds", tmp_path / "cache")


@needs_apt
def test_unreachable_mirror_is_source_unavailable(tmp_path, monkeypatch):
    uris = subprocess.run(["apt-get", "download", "--print-uris", "lomiri-wallpapers-16.04"],
                          capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    if not re.search(r"^'https?://", uris, flags=re.MULTILINE):
        pytest.skip("apt does not fetch lomiri-wallpapers-16.04 over http(s) here")
    conf = tmp_path / "apt.conf"  # a proxy nobody listens on, no retries: fails at once, offline
    conf.write_text('Acquire::http::Proxy "http://127.0.0.1:9";\nAcquire::https::Proxy "http://127.0.0.1:9";\n'
                    'Acquire::Retries "0";\n')  # fmt: skip
    monkeypatch.setenv("APT_CONFIG", str(conf))
    with pytest.raises(SourceUnavailable) as info:
        fetch_debian_package("lomiri-wallpapers-16.04", tmp_path / "cache")
    message = str(info.value)
    assert "\n" not in message and "'lomiri-wallpapers-16.04'" in message and "mirror unreachable" in message
    assert not (tmp_path / "cache" / "lomiri-wallpapers-16.04" / "root").exists()


def test_photos_skip_unreachable_packages_and_fail_when_none_works(tmp_path, monkeypatch, caplog):
    def unavailable(name, cache_dir):
        raise SourceUnavailable(f"cannot fetch Debian package {name!r}: mirror unreachable: test")

    monkeypatch.setattr(debian_photos, "fetch_debian_package", unavailable)
    with caplog.at_level(logging.WARNING), pytest.raises(SourceUnavailable, match="no photo package"):
        build_photos(tmp_path, tmp_path / "cache", limit=2)
    assert sum("skipping photo package" in r.message for r in caplog.records) == len(PHOTO_PACKAGES)
    with pytest.raises(ConfigError, match="unknown photo package"):
        build_photos(tmp_path, tmp_path / "cache", packages=["nope"])


def test_dep5_last_matching_paragraph_wins():
    text = (
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
        "Files: *\nCopyright: 2000, Someone\nLicense: GPL-2+\n\n"
        "# a comment\n"
        "Files: 16.04/a_by_X.jpg\n 16.04/b_*.jpg\nCopyright: X, 2018\n           Y, 2019\n"
        "License: CC-BY-4.0\n"
        " Text of the license.\n\n"
        "License: GPL-2+\n Full text.\n"
    )
    paragraphs = parse_dep5(text)
    assert dep5_lookup(paragraphs, "16.04/a_by_X.jpg") == ("CC-BY-4.0", "X, 2018; Y, 2019")
    assert dep5_lookup(paragraphs, "16.04/b_anything.jpg")[0] == "CC-BY-4.0"
    assert dep5_lookup(paragraphs, "other/c.jpg") == ("GPL-2+", "2000, Someone")
    assert dep5_lookup([], "x") == ("unknown", "unknown")


# --------------------------------------------------------------------------- real packages


@pytest.mark.slow
def test_fetch_is_cached(debian_cache):
    root = fetch_debian_package(TUXPAINT_PACKAGE, debian_cache)
    info = debian.package_info(root)
    assert info.name == TUXPAINT_PACKAGE and info.version and len(info.sha256) == 64
    assert (root / tuxpaint.STAMPS_DIR).is_dir() and info.copyright_file().is_file()
    stamp = (root.parent / "package.json").stat().st_mtime_ns
    assert fetch_debian_package(TUXPAINT_PACKAGE, debian_cache) == root  # no second download
    assert (root.parent / "package.json").stat().st_mtime_ns == stamp


def test_tuxpaint_stamps(debian_cache, tmp_path):
    out = build_tuxpaint(tmp_path / "tux", debian_cache, limit=8, seed=0)
    pngs, txts = sorted(out.glob("tuxpaint_*.png")), sorted(out.glob("tuxpaint_*.txt"))
    assert len(pngs) == len(txts) == 8
    assert [p.stem for p in pngs] == [t.stem for t in txts] == [f"tuxpaint_{i:04d}" for i in range(8)]
    root = fetch_debian_package(TUXPAINT_PACKAGE, debian_cache)
    records = [json.loads(line) for line in (out / "tuxpaint.jsonl").read_text("utf-8").splitlines()]
    for png, txt, record in zip(pngs, txts, records, strict=True):
        with Image.open(png) as image:
            assert image.mode == "RGB" and max(image.size) <= 512 and min(image.size) >= 32
            assert max(image.size) / min(image.size) <= 4
            assert image.size == (record["width"], record["height"])
        lines = txt.read_text("utf-8").splitlines()
        assert re.search(r"[A-Za-z]", lines[0]) and "=" not in lines[0]
        assert any(re.match(r"zh_(CN|TW)(\.\w+)?=", ln) and _CJK.search(ln) for ln in lines[1:])
        original = root / record["original_path"]
        assert txt.read_bytes() == original.with_suffix(".txt").read_bytes()
        assert record["license"] == "GPL-2" and record["zh"] in txt.read_text("utf-8")
        captions = alt_text_captions(txt.read_text("utf-8"))  # what the alt-text backend will read
        assert captions["en"]["short"] == lines[0].strip() and _CJK.search(captions["zh"]["short"])
    sources = (out / "SOURCES.md").read_text("utf-8")
    version = debian.package_info(root).version
    assert "GPL-2" in sources and TUXPAINT_PACKAGE in sources and version in sources
    assert "License: GPL-2" in (out / "LICENSE").read_text("utf-8")
    # a stamp with transparency comes out on white, not black
    corners = [Image.open(p).getpixel((0, 0)) for p in pngs]
    assert corners.count((255, 255, 255)) >= len(pngs) // 2


def test_tuxpaint_is_deterministic_and_idempotent(debian_cache, tmp_path):
    a = build_tuxpaint(tmp_path / "a", debian_cache, limit=8, seed=0)
    b = build_tuxpaint(tmp_path / "b", debian_cache, limit=8, seed=0)
    assert _digest(a) == _digest(b)
    mtimes = {p.name: p.stat().st_mtime_ns for p in a.iterdir()}
    build_tuxpaint(a, debian_cache, limit=8, seed=0)  # nothing to do: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in a.iterdir()} == mtimes
    c = build_tuxpaint(tmp_path / "c", debian_cache, limit=8, seed=1)
    assert _digest(c)["tuxpaint.jsonl"] != _digest(a)["tuxpaint.jsonl"]
    build_tuxpaint(a, debian_cache, limit=3, seed=1)  # another selection in place: stale pairs go
    assert _digest(a) == _digest(build_tuxpaint(tmp_path / "d", debian_cache, limit=3, seed=1))
    assert len(list(a.glob("tuxpaint_*"))) == 6


@pytest.mark.slow
def test_photos(debian_cache, tmp_path):
    out = build_photos(tmp_path / "a", debian_cache, limit=4, seed=0)
    photos = sorted(out.glob("photo_*.jpg"))
    assert len(photos) == 4
    records = [json.loads(line) for line in (out / "photos.jsonl").read_text("utf-8").splitlines()]
    assert [r["file"] for r in records] == [p.name for p in photos]
    for photo, record in zip(photos, records, strict=True):
        with Image.open(photo) as image:
            assert image.mode == "RGB" and image.format == "JPEG" and max(image.size) <= 768
            assert image.size == (record["width"], record["height"])
        assert record["package"] in PHOTO_PACKAGES and record["original_path"]
        assert record["license"] not in ("", "unknown") and record["copyright"]
        assert "caption" not in record and not photo.with_suffix(".txt").exists()
    assert (out / "LICENSE").is_file() and "| license |" in (out / "SOURCES.md").read_text("utf-8")
    again = build_photos(tmp_path / "b", debian_cache, limit=4, seed=0)
    assert _digest(out) == _digest(again)


def test_photo_licenses_come_from_the_copyright_files(debian_cache):
    by_package = {}
    for source in debian_photos.PHOTO_SOURCES:
        pkg = debian.package_info(fetch_debian_package(source.package, debian_cache))
        found = debian_photos.photo_candidates(source, pkg)
        assert found, source.package
        by_package[source.package] = {p.rel.rsplit("/", 1)[-1]: p.license for p in found}
    assert by_package["lomiri-wallpapers-16.04"]["seeding_by_Clements_Engelhardt.jpg"] == "CC0-1.0"
    assert by_package["lomiri-wallpapers-16.04"]["Dragonfly_by_Bolly.jpg"] == "CC-BY-SA-4.0"
    assert set(by_package["mate-backgrounds"].values()) == {"GPL-2+"}
    assert "unknown" not in {lic for licenses in by_package.values() for lic in licenses.values()}
