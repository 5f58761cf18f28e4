"""Redis stores: instance records, sequences, stream, codecs, cluster. Knows nothing of PyTorch modules."""
