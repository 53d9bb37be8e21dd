"""asv suites of structlayers; one module per area (see asv_bench/README.md)."""
