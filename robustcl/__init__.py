"""robustcl: self-supervised adversarial pre-training of image encoders."""

__version__ = "0.1.0"
