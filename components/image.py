"""The container image every KFP component runs in (built by ``make image`` from ``Dockerfile``).

Override with ``LUMINA_IMAGE`` when compiling for a registry, e.g.
``LUMINA_IMAGE=registry.example.com/ml/lumina-pipeline:0.1.0 make pipeline-compile``.
"""

import os
from collections.abc import Callable
from typing import Any

from kfp import dsl

IMAGE_VERSION = "0.1.0"
BASE_IMAGE = os.environ.get("LUMINA_IMAGE", f"lumina-pipeline:{IMAGE_VERSION}")


def lumina_component(func: Callable) -> Any:
    """``dsl.component`` on the project image. The image has kfp and the project installed, so a task
    pip-installs nothing when it starts (kfp's default command installs kfp in every task: a network
    call per step on the cluster, and kfp's local runner runs such tasks one at a time)."""
    return dsl.component(func, base_image=BASE_IMAGE, install_kfp_package=False)
