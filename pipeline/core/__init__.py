"""Helpers every layer may use: errors, atomic files, the one image decoder, perceptual hashes,
process pools, progress and tables. They know nothing of stages, formats or models."""
