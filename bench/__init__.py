"""Benchmarks (run by ``make bench``): ratios against a peer measured in the same process."""
