"""Ingest: durable pull consumers, dedupe, fleet state, drift events, snapshots, the lease."""
