"""Benchmarks behind `make bench`, `make bench-export` and `make bench-trunk`, each runnable as
`python -m mtlsparse.benchmarks.<name>`: training throughput of methods and balancers
(`balancers`), compaction speed-up (`export`), trunk once per batch vs per task (`trunk`)."""
