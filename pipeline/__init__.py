"""pipeline: from ImageNet synset ids to a fine-tuned image classifier."""

__version__ = "0.1.0"
