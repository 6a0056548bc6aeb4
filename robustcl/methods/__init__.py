"""The self-supervised methods, one file each (its ``Method``); their options are in robustcl/method_options/ and
robustcl/method_registry.py names both for recipes. What a method implements: see ``base.Method``."""
