"""fedavg: FedAvg of the clients' SLM LoRA, no LLM involvement."""
