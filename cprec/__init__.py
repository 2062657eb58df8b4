"""Shared core of cprec: the behaviour text template and the language-model loading/pooling.

Both the online service and the offline training import from here, so a model is always served
with exactly the text format and pooling it was trained with.
"""

__version__ = "0.1.0"
