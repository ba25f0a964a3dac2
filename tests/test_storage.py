"""The storage layer (:mod:`storage.io`) on local paths and against a real loopback S3 server."""

from __future__ import annotations

import pytest

import storage
from common.errors import ConfigError
from storage import StorageError

# ------------------------------------------------------------------------------ local paths


def test_local_list_is_sorted_and_complete(tmp_path):
    for name in ["b/2.txt", "a.txt", "b/1.txt", "c/d/e.bin"]:
        storage.write_bytes(tmp_path / name, name.encode())
    listed = list(storage.list_objects(tmp_path))
    assert [o.uri for o in listed] == [
        str(tmp_path / n) for n in ["a.txt", "b/1.txt", "b/2.txt", "c/d/e.bin"]
    ]
    assert [o.size for o in listed] == [5, 7, 7, 9]
    assert all(o.version for o in listed)
    (one,) = storage.list_objects(tmp_path / "a.txt")  # a single file lists itself
    assert one.uri == str(tmp_path / "a.txt") and one.size == 5


def test_local_must_exist(tmp_path):
    with pytest.raises(StorageError, match="not found") as info:
        list(storage.list_objects(tmp_path / "nope"))
    assert isinstance(info.value, ConfigError) and "\n" not in str(info.value)
    assert list(storage.list_objects(tmp_path / "nope", must_exist=False)) == []
    assert not storage.exists(tmp_path / "nope")
    with pytest.raises(StorageError, match="cannot read"):
        storage.read_bytes(tmp_path / "nope")
    with pytest.raises(StorageError, match="cannot read"):
        storage.download_file(tmp_path / "nope", tmp_path / "out" / "x")
    assert not (tmp_path / "out" / ".x.partial").exists()


def test_local_write_bytes_is_atomic_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "blob.bin"
    assert storage.write_bytes(target, b"first") == str(target)
    storage.write_bytes(target, b"second")
    assert target.read_bytes() == b"second" and storage.exists(target)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["blob.bin"]
    copy = tmp_path / "copy" / "blob.bin"
    storage.upload_file(target, copy)
    assert storage.read_bytes(copy) == b"second"
    assert sorted(p.name for p in copy.parent.iterdir()) == ["blob.bin"]
    storage.download_file(copy, tmp_path / "dl" / "blob.bin")
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["blob.bin"]


def test_local_read_range(tmp_path):
    path = tmp_path / "shard.tar"
    storage.write_bytes(path, bytes(range(100)))
    assert storage.read_range(path, 10, 5) == bytes([10, 11, 12, 13, 14])
    assert storage.read_range(path, 0, 100) == bytes(range(100))
    with pytest.raises(StorageError, match=r"truncated: .* has 10 of 20 bytes at offset 90"):
        storage.read_range(path, 90, 20)


def test_uris_and_join(tmp_path):
    assert storage.is_s3("s3://b/k") and not storage.is_s3(tmp_path)
    assert storage.parse_s3("s3://bucket/a/b.txt") == ("bucket", "a/b.txt")
    assert storage.parse_s3("s3://bucket") == ("bucket", "")
    with pytest.raises(StorageError, match="expected s3://bucket/prefix"):
        storage.parse_s3("s3:///key")
    with pytest.raises(StorageError, match="not an s3:// URI"):
        storage.parse_s3("/local/path")
    assert storage.join("s3://bucket/prefix/", "/a/", "b.txt") == "s3://bucket/prefix/a/b.txt"
    assert storage.join("s3://bucket", "x") == "s3://bucket/x"
    assert storage.join(tmp_path, "a", "b.txt") == str(tmp_path / "a" / "b.txt")


def test_client_region_and_endpoint_from_environment(monkeypatch):
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    client = storage.s3_client()
    assert client.meta.region_name == "us-east-1" and client.meta.endpoint_url == "http://127.0.0.1:9"
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert storage.s3_client().meta.region_name == "eu-west-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    assert storage.s3_client("http://127.0.0.1:10").meta.region_name == "eu-central-1"
    assert storage.s3_client("http://127.0.0.1:10").meta.endpoint_url == "http://127.0.0.1:10"


# ----------------------------------------------------------------------------- loopback S3
def test_s3_write_read_list_and_range(s3, tmp_path):
    base = "s3://lumina/data"
    for name in ["b/2.txt", "a.txt", "b/1.txt"]:
        assert storage.write_bytes(storage.join(base, name), name.encode()) == f"{base}/{name}"
    storage.write_bytes("s3://lumina/data-other/x.txt", b"sibling")  # shares the prefix start
    listed = list(storage.list_objects(f"{base}/"))
    assert [o.uri for o in listed] == [f"{base}/a.txt", f"{base}/b/1.txt", f"{base}/b/2.txt"]
    assert [o.size for o in listed] == [5, 7, 7] and all(o.version for o in listed)
    assert storage.read_bytes(f"{base}/b/1.txt") == b"b/1.txt"
    assert storage.read_range(f"{base}/b/1.txt", 2, 3) == b"1.t"
    with pytest.raises(StorageError, match="truncated"):
        storage.read_range(f"{base}/a.txt", 3, 10)
    assert storage.exists(f"{base}/a.txt") and not storage.exists(f"{base}/zzz.txt")

    local = tmp_path / "up.bin"
    local.write_bytes(b"uploaded")
    storage.upload_file(local, f"{base}/up.bin")
    out = storage.download_file(f"{base}/up.bin", tmp_path / "dl" / "up.bin")
    assert out.read_bytes() == b"uploaded"
    assert sorted(p.name for p in out.parent.iterdir()) == ["up.bin"]


def test_s3_missing_bucket_is_one_line(s3):
    for call in (
        lambda: list(storage.list_objects("s3://no-such-bucket/x")),
        lambda: storage.read_bytes("s3://no-such-bucket/x"),
        lambda: storage.write_bytes("s3://no-such-bucket/x", b"x"),
    ):
        with pytest.raises(StorageError, match="does not exist") as info:
            call()
        message = str(info.value)
        assert "\n" not in message and "s3://no-such-bucket/x" in message


def test_s3_empty_prefix(s3):
    with pytest.raises(StorageError, match=r"nothing under s3://lumina/empty-prefix/"):
        list(storage.list_objects("s3://lumina/empty-prefix/"))
    assert list(storage.list_objects("s3://lumina/empty-prefix/", must_exist=False)) == []


def test_s3_download_missing_key(s3, tmp_path):
    with pytest.raises(StorageError, match=r"cannot download s3://lumina/missing\.bin") as info:
        storage.download_file("s3://lumina/missing.bin", tmp_path / "missing.bin")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no partial file left behind
    with pytest.raises(StorageError, match="no such object"):
        storage.read_bytes("s3://lumina/missing.bin")


def test_concurrent_fetches_into_one_folder_share_one_download(s3, tmp_path, tiny_folder):
    """Two fetches of the same model into one cache folder (two server pods on one volume): one
    downloads under the folder's lock, the other waits and reuses it; neither breaks the other."""
    from concurrent.futures import ThreadPoolExecutor

    from storage.models import resolve_source

    for path in tiny_folder.rglob("*"):
        if path.is_file():
            storage.upload_file(path, f"s3://lumina/race/{path.relative_to(tiny_folder).as_posix()}")
    dest = tmp_path / "cache"
    with ThreadPoolExecutor(4) as pool:
        folders = list(pool.map(lambda _: resolve_source("s3://lumina/race", dest), range(4)))
    assert len(set(folders)) == 1 and (folders[0] / "model_index.json").is_file()
    assert not (dest / ".partial").exists()
    assert resolve_source("s3://lumina/race", dest) == folders[0]  # the lock file is not "foreign"
