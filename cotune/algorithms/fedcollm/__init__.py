"""FedCoLLM: FedAvg of the clients' SLM LoRA, then mutual distillation of the LLM and an SLM copy on the server."""
