"""Step 1: ingest images (local folder or tar shards) into a checked, deduplicated manifest."""
