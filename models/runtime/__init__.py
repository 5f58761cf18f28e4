"""The serving runtime: serving modules, loading exported artifacts, featurizing requests. Never imports training, data loading or benchmarks."""
