"""centralized: the NON-FEDERATED reference (an upper bound on what pooling the data would give)."""
