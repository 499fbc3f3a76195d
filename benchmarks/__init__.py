"""ngcuda's benchmarks: `python -m benchmarks <factor|eigh|...> [--quick]`."""
