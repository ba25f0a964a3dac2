"""Offline data tooling: the sample dataset builders (issue #3 grows this into the data path)."""
