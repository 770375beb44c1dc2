"""FedBiOT (and FedOT): the server compresses its LLM into emulator + adapter; clients tune the adapter."""
