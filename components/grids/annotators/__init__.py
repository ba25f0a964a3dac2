"""Condition-map annotators (one module each; looked up through :mod:`.registry`)."""
