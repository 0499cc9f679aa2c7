"""The HTTP API and the `aetrain` command line."""
