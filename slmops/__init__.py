"""slmops: the composition root (CLI, demo, bench). Imports shared, edge and cloud."""
