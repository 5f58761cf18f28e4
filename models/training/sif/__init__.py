"""SIF training: losses, history batches, the SIF rows, codebook health, compression."""
