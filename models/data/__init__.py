"""Dataset schemas (TOML), loading and preparing datasets, synthetic data, raw instances for replay."""
