"""Reading YAML config files with one-line errors (missing file, bad YAML, not a mapping)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from common.errors import ConfigError


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The mapping in a YAML file (an empty file is ``{}``); :class:`ConfigError` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of keys to values")
    return data
