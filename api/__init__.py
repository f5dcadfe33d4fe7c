"""HTTP API of MinorDPO Service (FastAPI)."""
