"""Speed and resource benchmarks; `python -m benchmarks` runs the CPU suite (see __main__.py)."""
