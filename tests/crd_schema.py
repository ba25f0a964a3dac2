"""Validating objects against the CustomResourceDefinitions vendored in ``tests/crds/``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml


def load_crd(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def strict_schema(node: Any) -> Any:
    """A CRD's structural schema as plain JSON schema: ``x-kubernetes-*`` dropped, and no field beyond
    the listed ``properties`` (the API server prunes or rejects unknown fields: a typo must fail here)."""
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if "properties" in node and "additionalProperties" not in node:
        assert not node.get("x-kubernetes-preserve-unknown-fields")
        out["additionalProperties"] = False
    return out


def crd_validator(open_api_schema: dict[str, Any]) -> jsonschema.Draft7Validator:
    """A validator of a CRD version's ``openAPIV3Schema``, made strict (:func:`strict_schema`)."""
    schema = strict_schema(open_api_schema)
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)
