"""Tools that produce edgemoe model directories and test models."""
