"""The `minordpo` command line."""
