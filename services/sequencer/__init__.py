"""The sequencer: stream of ingested instances -> per-user sequences (at least once, idempotent)."""
