"""FedKRSO: federated K-seed random subspace optimization (mathematics, wire format, client)."""
