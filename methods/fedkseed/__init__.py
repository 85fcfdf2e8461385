"""FedKSeed: zero-order federated fine-tuning over K candidate seeds (the reference for FedSPZO)."""
