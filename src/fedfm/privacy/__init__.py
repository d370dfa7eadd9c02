"""Privacy: client-level differential privacy (DP-FedAvg with a dp-accounting accountant)."""
