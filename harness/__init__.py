"""Benchmarks, the demo, the process runner and peer systems. The runtime never imports it."""
