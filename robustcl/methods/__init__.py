"""The self-supervised methods, one file each (its options class and its ``Method``); robustcl/method_registry.py
names them for recipes."""
