"""Pure replication logic: no asyncio, no sockets, no SQLite. Time and randomness are inputs."""
