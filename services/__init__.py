"""Services: source, sequencer, ranking, and the `iat` CLI. The only place that joins models and storage."""
