"""Training, offline evaluation and experiments (the paper's rows)."""
