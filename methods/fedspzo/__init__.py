"""FedSPZO: split-perturbation zero-order federated fine-tuning."""
