"""`mtlsparse report`'s parts: `collect` (job dirs → rows), `tables` (summary.csv / summary.md) and
`plots` (PNGs); the Pareto front itself comes from `mtlsparse.pareto`, the command from `mtlsparse.report`."""
