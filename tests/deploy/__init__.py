"""Offline checks of the container files (Dockerfile, .dockerignore, docker-compose.yml)."""
