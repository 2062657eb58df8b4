"""Versioned artifacts: atomic publish, aliases, checksum-verified loads.

``training/`` writes models only through :meth:`ModelStore.publish`; ``service/`` reads them only
through :meth:`ModelStore.load` and keeps its index snapshots with the same primitives
(:func:`publish_dir`, :func:`verify`, :func:`write_atomic`). This package imports nothing of the
project's.
"""

from model_store.store import (
    Artifact,
    ArtifactError,
    Manifest,
    ModelStore,
    library_versions,
    publish_dir,
    sha256_file,
    verify,
    write_atomic,
)

__all__ = [
    "Artifact",
    "ArtifactError",
    "Manifest",
    "ModelStore",
    "library_versions",
    "publish_dir",
    "sha256_file",
    "verify",
    "write_atomic",
]
