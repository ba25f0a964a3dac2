"""Server settings: the environment (pydantic-settings) and a YAML file of defaults and limits.

Environment (what the Helm chart sets):

- ``LUMINA_MODEL_SOURCE``: ``models:/<name>@<alias>`` (MLflow registry at ``MLFLOW_TRACKING_URI``),
  ``s3://bucket/prefix`` (boto3, honours ``AWS_ENDPOINT_URL``) or a local diffusers folder
- ``LUMINA_MODEL_DIR``: local cache folder for downloaded weights
- ``LUMINA_AUTH_TOKEN``: optional bearer token required on ``/v1/*``
- ``LUMINA_DEFAULTS_FILE``: YAML with the keys of :class:`ServingDefaults`
- ``LUMINA_DEVICE``: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``...
- ``LUMINA_TORCH_THREADS``: CPU threads for torch (0: torch's default, one per core). Set it to the
  container's CPU limit: OpenMP teams larger than the CPU time a pod gets spin at every barrier
  and can slow tiny models down a hundredfold (measured on 2 shared cores).
- ``LUMINA_TIMEOUT_KEEP_ALIVE_S``: uvicorn closes an idle keep-alive connection after this long
- ``LUMINA_MAX_HEADER_BYTES``: h11's bound on a request's head (request line + headers); more
  is a 400 and the connection is closed
- ``LUMINA_LIMIT_CONCURRENCY``: optional cap on open connections + running tasks (uvicorn answers
  503 beyond it)

uvicorn has no timeout for reading a request's headers or body (a client that trickles bytes
keeps its connection): the keep-alive timeout only runs between requests, the header bound is a
size, not a time. Put a proxy / ingress with read timeouts in front of the server, and use
``LUMINA_LIMIT_CONCURRENCY`` to bound how many such connections it holds.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.config_files import read_yaml_mapping
from common.errors import ConfigError, validation_message
from model.sampler import SamplerConfig
from model.sampler.sampler import PIXEL_MULTIPLE
from serving.fetch import DEFAULT_MODEL_DIR


class ServingDefaults(SamplerConfig):
    """Request defaults and server limits (``LUMINA_DEFAULTS_FILE``). Unknown keys are rejected.

    The sampler settings (steps, guidance, CFG-Trunc/Renorm, solver, TeaCache, system prompt) are
    :class:`SamplerConfig`'s own fields and defaults; this adds the image size and the limits."""

    model_config = ConfigDict(extra="forbid")

    height: int = Field(1024, ge=PIXEL_MULTIPLE)
    width: int = Field(1024, ge=PIXEL_MULTIPLE)
    # limits
    max_batch: int = Field(4, ge=1, description="most prompts in one request")
    max_side: int = Field(1024, ge=PIXEL_MULTIPLE, description="largest height / width in pixels")
    max_steps: int = Field(50, ge=1)
    max_prompt_chars: int = Field(2000, ge=1)
    queue_size: int = Field(16, ge=1, description="requests waiting for the worker; more get 429")
    batch_window_ms: float = Field(
        5.0, ge=0.0, description="how long the worker waits for compatible requests to batch with"
    )
    micro_batch: bool = Field(True, description="merge compatible queued requests into one model call")
    merge_rows: int | None = Field(
        None, ge=1, description="most images in one merged sampler call (default: max_batch)"
    )
    request_timeout_s: float = Field(
        600.0, gt=0.0, description="a request waiting longer than this (queue + generation) gets 504"
    )
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="largest request body; a longer one gets 413 without being read"
    )
    max_input_image_bytes: int = Field(
        640 * 1024,
        ge=1,
        description="largest decoded input_image (bytes); more is a 413. Its base64 (4/3 of it) "
        "must also fit max_body_bytes",
    )
    max_input_pixels: int = Field(
        2048 * 2048,
        ge=1,
        description="largest input_image width x height, checked from the header before decoding "
        "(decompression bombs); more is a 413",
    )
    liveness_timeout_s: float = Field(
        900.0,
        gt=0.0,
        description="/healthz is 503 once the worker has not come back from one job (or its idle "
        "loop) for this long",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ServingDefaults:
        if self.steps > self.max_steps:
            raise ValueError(f"default steps {self.steps} exceed max_steps {self.max_steps}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value % PIXEL_MULTIPLE or value > self.max_side:
                raise ValueError(
                    f"default {name} {value} must be a multiple of {PIXEL_MULTIPLE} and at most "
                    f"max_side {self.max_side}"
                )
        return self

    def sampler_config(self) -> SamplerConfig:
        """The request-independent sampler settings (a request's own values override them)."""
        return SamplerConfig(**self.model_dump(include=set(SamplerConfig.model_fields)))


def load_defaults(path: str | Path | None) -> ServingDefaults:
    """Read the defaults file (``None``: built-in defaults); one-line :class:`ConfigError` if bad."""
    if path is None or str(path) == "":
        return ServingDefaults()
    path = Path(path)
    data = read_yaml_mapping(path, "defaults file")
    try:
        return ServingDefaults(**data)
    except ValidationError as exc:
        raise ConfigError(f"defaults file {path}: {validation_message(exc)}") from exc


class ServerSettings(BaseSettings):
    """Settings from ``LUMINA_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="LUMINA_", extra="ignore", protected_namespaces=())

    model_source: str | None = None
    model_dir: Path = DEFAULT_MODEL_DIR
    auth_token: SecretStr | None = None
    defaults_file: Path | None = None
    device: str = "auto"
    torch_threads: int = Field(0, ge=0)
    timeout_keep_alive_s: int = Field(5, ge=1, description="idle keep-alive connections close after this")
    max_header_bytes: int = Field(16 * 1024, ge=1024, description="h11 bound on a request's head")
    limit_concurrency: int | None = Field(None, ge=1, description="uvicorn: connections + tasks; 503 beyond")

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def token(self) -> str | None:
        value = self.auth_token.get_secret_value() if self.auth_token is not None else ""
        return value or None
