"""Bridge between the job store and Ray Train: dispatcher, entrypoint, metric forwarding."""
