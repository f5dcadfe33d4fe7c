"""Request-independent logic behind the routers: jobs, datasets, validation, auth, path policy."""
