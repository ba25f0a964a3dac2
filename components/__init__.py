"""Pipeline steps: each a plain, importable function with a thin KFP component wrapper."""
