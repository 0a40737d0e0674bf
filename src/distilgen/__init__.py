"""distilgen: distil a large text-generation model into a small, fast student for one task.

Pipeline (one module per stage): data -> models -> train (finetune) -> evaluate.
"""

__version__ = "0.1.0"
