"""HTTP sampler server for Lumina-Image 2.0 models (FastAPI + uvicorn).

``python -m serving --host 0.0.0.0 --port 8080`` serves the model named by ``LUMINA_MODEL_SOURCE``
(or ``--model``); ``python -m serving.fetch --source SRC --dest DIR`` only downloads it.
See :mod:`serving.routes` for the endpoints (assembled by :mod:`serving.app`) and
:mod:`serving.settings` for the configuration.
"""
