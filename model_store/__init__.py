"""Versioned model artifacts: atomic publish, aliases, checksum-verified loads.

``training/`` writes only through :meth:`ModelStore.publish`; ``service/`` reads only through
:meth:`ModelStore.load`. This package imports neither of them.
"""

from model_store.store import (
    Artifact,
    ArtifactError,
    Manifest,
    ModelStore,
    library_versions,
    sha256_file,
)

__all__ = ["Artifact", "ArtifactError", "Manifest", "ModelStore", "library_versions", "sha256_file"]
