"""FedAvg full fine-tuning baseline."""
