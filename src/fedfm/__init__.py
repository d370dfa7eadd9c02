"""fedfm: federated fine-tuning of foundation models on data that never leaves its owner."""

__version__ = "0.1.0"
