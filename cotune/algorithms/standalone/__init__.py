"""standalone: each client trains on its own private data; nothing is exchanged."""
