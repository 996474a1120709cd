"""Benchmarks: every speed, memory and quality number in docs/ is a command here (JSON + markdown out)."""
