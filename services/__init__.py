"""Local services the embedded default and the tests start and stop: a loopback S3 server and an
MLflow tracking server, both real processes."""
