"""Project-wide helpers below every other package: one-line errors, logging, the CLI runner, config files."""
