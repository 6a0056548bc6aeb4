"""Each method's recipe options (its ``method`` section), one file per method, pydantic only: reading a recipe imports
its method's options here and nothing of training (robustcl/methods/), so evaluation and export read any run's
recipe without the training code. robustcl/method_registry.py names each method's options and its ``Method``."""
