"""The machine-learning pieces shared by training and serving: preprocessing, normalization,
datasets and loaders, models and metrics."""
