"""Compaction: physically remove the channels of a channel-sparse model that no output depends on.

`graph` decides which channels can go (dependency analysis under a budget, architectures
refused up front), `surgery` cuts them and checks the outputs, `serialise` saves and
reloads `compact_model.pt`. `mtlsparse.export` is the command that runs them on a run dir.
"""
