"""Benchmarks of jdeq against TorchDEQ, jaxopt and optimistix (``make bench``; see docs/benchmarks.md)."""
