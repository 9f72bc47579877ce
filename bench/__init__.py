"""Benchmarks: speed, memory and UNet-call counts of the engine (never run by pytest; see README.md)."""
