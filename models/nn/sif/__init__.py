"""SIF networks: sub-token encoder, residual VQ, Sample Tokenizer, SIF-Mixer."""
