"""The cprec recommendation service (FastAPI)."""

import os

# oneDNN caches compiled primitives per input shape (1024 by default). Dynamic batching makes
# many (batch, length) shapes: that cache grew a MiniLM encoder's RSS by 1 GiB over a
# few hundred batches; 16 cut that growth by ~40% at the same speed (shapes are also bucketed to
# multiples of 8 in cprec.lm). Must be set before torch first runs a oneDNN kernel.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")
