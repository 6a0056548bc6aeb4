"""robustcl: self-supervised adversarial pre-training of image encoders.

Importing robustcl registers its model type with transformers, so ``AutoModel.from_pretrained(export)`` and
``AutoModelForImageClassification.from_pretrained(export)`` load robustcl exports without ``trust_remote_code``.
"""

__version__ = "0.1.0"

from . import models  # noqa: E402,F401  (the registration above happens on import)
