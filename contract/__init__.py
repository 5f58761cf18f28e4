"""The online contract: what storage, models and services agree on. Imports neither torch nor redis."""
