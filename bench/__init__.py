"""Benchmarks of layerstore against a normal pull; not part of the test suite."""
