"""Benchmarks (``python -m bench``); they run the service's code under the service's runtime."""

from cprec.runtime import configure_runtime

configure_runtime()  # as service/__init__.py does, before torch loads
