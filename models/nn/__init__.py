"""Network definitions (torch modules) shared by training and the serving runtime; no data loading, no training loops."""
