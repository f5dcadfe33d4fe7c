"""Core engine of MinorDPO Service: spec, losses, data, models, training loop, store (no web, no Ray)."""
