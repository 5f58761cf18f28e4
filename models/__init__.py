"""Pure PyTorch and data: features, IAT and SIF models, training, evaluation, export. Knows nothing of Redis, HTTP or gRPC."""
