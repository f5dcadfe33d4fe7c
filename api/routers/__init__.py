"""HTTP routers: thin handlers that call api.services."""
