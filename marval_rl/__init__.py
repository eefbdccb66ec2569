"""marval-rl: post-training toolkit for masked autoregressive (MAR) image generators."""
__version__ = "0.1.0"
