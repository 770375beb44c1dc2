"""FedMKT: mutual knowledge transfer between the LLM and the SLMs through public top-k logits (and llm2slm, its
one-way setting)."""
