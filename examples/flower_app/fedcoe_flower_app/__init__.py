"""FedCoE as a Flower app: the ServerApp and ClientApp come from ``fedcoe_edge.flower``."""
