"""The cprec recommendation service (FastAPI over ``service.engine.Engine``)."""

from cprec.runtime import configure_runtime

configure_runtime()  # before anything imports torch: its runtimes read these once, at load
