"""The cprec model: what training and serving share.

- ``cprec.text``: the one behaviour-text template (CPRec's unified prompt).
- ``cprec.lm``: LM loading, tokenisation, pooling, device and dtype, ``resolve_base_model``.
- ``cprec.encoder``: the item/text encoder (``Encoder``: tokenise, forward, pool).
- ``cprec.hier``: the hierarchical user model (``HierRec``) and the zero-shot scoring.
- ``cprec.recommender``: a whole recommender (LM + user encoder) saved and loaded as one folder.
- ``cprec.runtime``: torch runtime settings a serving process sets before torch loads.

Importing this package has no side effects; nothing here imports ``service`` or ``training``.
"""

__version__ = "0.1.0"
