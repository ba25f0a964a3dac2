"""The container image every KFP component runs in (built by ``make image`` from ``Dockerfile``).

Override with ``LUMINA_IMAGE`` when compiling for a registry, e.g.
``LUMINA_IMAGE=registry.example.com/ml/lumina-pipeline:0.1.0 make pipeline-compile``.
"""

import os

IMAGE_VERSION = "0.1.0"
BASE_IMAGE = os.environ.get("LUMINA_IMAGE", f"lumina-pipeline:{IMAGE_VERSION}")
