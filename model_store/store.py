"""One directory per version with fixed file names, a manifest and a model card.

Layout under ``root``::

    versions/<version>/manifest.json   # what it is, how it was made, sha256 of every file
    versions/<version>/README.md       # model card generated from the manifest
    versions/<version>/model.safetensors, config.json, tokenizer files ...
    aliases/<name>                     # a one-line file holding a version (latest, production)

Publishing writes into a temporary directory, fsyncs, then renames it into place: a reader sees a
complete version or none. Aliases are moved with an atomic rename too.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

MANIFEST = "manifest.json"
MANIFEST_SUM = "manifest.sha256"  # the manifest cannot list its own checksum, so it sits beside it
CARD = "README.md"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_LIBS = ("torch", "transformers", "peft", "faiss-cpu", "numpy", "tokenizers", "safetensors")


class ArtifactError(Exception):
    """A version is missing, incomplete or corrupt. ``file`` names the offending file if any."""

    def __init__(self, message: str, file: str | None = None) -> None:
        super().__init__(message)
        self.file = file


class Manifest(BaseModel):
    """Everything needed to serve, reproduce and audit one model version."""

    version: str
    created_at: str = Field(
        default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    )
    kind: str = Field(
        default="flat",
        description="flat: the LM encodes history text and item titles (LLM-Rec dual encoder); "
        "hier: the LM encodes item texts, cprec.hier.HierRec (files under hier/) reads the "
        "history's item vectors.",
    )
    base_model: str = Field(description="Bundled name or path of the model this was trained from.")
    pooling: str = Field(description="mean | cls | last")
    is_decoder: bool = False
    dim: int
    max_length: int = 256
    template: dict[str, Any] = Field(default_factory=dict, description="cprec.text.Template dump.")
    parent: str | None = Field(default=None, description="Version this one was trained from.")
    config: dict[str, Any] = Field(default_factory=dict, description="Resolved training config.")
    data_hash: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    library_versions: dict[str, str] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict, description="relative path -> sha256")


@dataclass(frozen=True, slots=True)
class Artifact:
    """A verified version on disk."""

    path: Path
    manifest: Manifest

    @property
    def version(self) -> str:
        return self.manifest.version

    def require(self, files: Iterable[str]) -> None:
        """Refuse files a loader reads that the manifest does not list (so no checksum covered
        them), naming the first."""
        for rel in files:
            if rel not in self.manifest.files:
                raise ArtifactError(
                    f"{self.path / rel}: not listed in the manifest, so not checksum-verified; "
                    "publish the whole folder through ModelStore.publish",
                    rel,
                )


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _LIBS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old bytes or the new, never a
    part (temp file, fsync, rename, fsync of the directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def render_card(m: Manifest, extra: str = "") -> str:
    """A model card in the spirit of sentence-transformers': what, how, how well, with what."""
    lines = [
        f"# cprec model `{m.version}`",
        "",
        f"- base model: `{m.base_model}`" + (f" (parent `{m.parent}`)" if m.parent else ""),
        f"- pooling: `{m.pooling}`, dimension {m.dim}, max length {m.max_length}",
        f"- data hash: `{m.data_hash or 'n/a'}`",
        f"- created: {m.created_at}",
        "",
        "## Text template",
        "",
        "```json",
        json.dumps(m.template, indent=2, sort_keys=True),
        "```",
    ]
    if m.metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---:|"]
        for key, value in sorted(_flatten(m.metrics).items()):
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"| {key} | {shown} |")
    if m.config:
        lines += [
            "",
            "## Config",
            "",
            "```json",
            json.dumps(m.config, indent=2, sort_keys=True),
            "```",
        ]
    lines += ["", "## Library versions", ""]
    lines += [f"- {k}: {v}" for k, v in sorted(m.library_versions.items())]
    if extra:
        lines += ["", extra.strip()]
    return "\n".join(lines) + "\n"


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def publish_dir(parent: Path, name: str, write: Callable[[Path], Mapping[str, Any]]) -> Path:
    """Create ``parent/name`` whole or not at all, with a checksummed manifest.

    ``write(tmp)`` fills a temporary sibling directory and returns the manifest's fields; the
    sha256 of every file it wrote goes into the manifest's ``files``, ``manifest.json`` and its
    own checksum (``manifest.sha256``) are written last, everything is fsynced and the directory
    renamed into place. A crash leaves only a ``.tmp-*`` sibling, which readers skip.
    """
    final = parent / name
    if final.exists():
        raise ArtifactError(f"{final} already exists")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=parent))
    try:
        fields = dict(write(tmp))
        fields["files"] = {
            p.relative_to(tmp).as_posix(): sha256_file(p)
            for p in sorted(tmp.rglob("*"))
            if p.is_file() and p.relative_to(tmp).as_posix() not in (MANIFEST, MANIFEST_SUM)
        }
        (tmp / MANIFEST).write_text(json.dumps(fields, indent=2), encoding="utf-8")
        (tmp / MANIFEST_SUM).write_text(sha256_file(tmp / MANIFEST) + "\n", encoding="utf-8")
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def verify(path: Path, require_sum: bool = True) -> dict[str, Any]:
    """The manifest of a directory made by :func:`publish_dir`, after checking the manifest's own
    checksum and every listed file's; :class:`ArtifactError` names the first file that is
    missing or changed. ``require_sum=False`` accepts a directory written before manifests had
    their own checksum (index snapshots), still checking it when present."""
    if require_sum or (path / MANIFEST_SUM).is_file():
        verify_manifest(path)
    manifest = _read_manifest(path)
    verify_files(path, manifest.get("files") or {})
    return manifest


_verify = verify  # ModelStore.load's ``verify`` flag shadows the name there


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path / MANIFEST}: unreadable manifest ({exc})", MANIFEST) from exc
    return data


class ModelStore:
    """A directory of versions and aliases. Safe for one writer and many readers."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.aliases_dir = self.root / "aliases"

    # -- writing -----------------------------------------------------------------------------
    def publish(
        self,
        src_dir: Path | str,
        manifest: Manifest | Mapping[str, Any],
        aliases: Iterable[str] = ("latest",),
        card_extra: str = "",
        extra_files: Mapping[str, Path] | None = None,
    ) -> Artifact:
        """Copy ``src_dir`` into a new version, write manifest + card, then move ``aliases``.

        ``manifest`` may omit ``version`` (a timestamped one is made), ``files`` and
        ``library_versions`` (filled in here).
        """
        src = Path(src_dir)
        if not src.is_dir():
            raise ArtifactError(f"publish source {src} is not a directory")
        data = dict(manifest.model_dump() if isinstance(manifest, Manifest) else manifest)
        version = data.get("version") or time.strftime("v%Y%m%d-%H%M%S", time.gmtime())
        aliases = list(aliases)
        for name in (version, *aliases):  # refuse bad names before anything is written
            self._check_name(name)
        if (self.versions_dir / version).exists():
            raise ArtifactError(f"version {version!r} already exists in {self.versions_dir}")
        data["version"] = version
        data["library_versions"] = {**library_versions(), **(data.get("library_versions") or {})}
        data["files"] = {}
        m = Manifest.model_validate(data)

        def write(tmp: Path) -> dict[str, Any]:
            for item in sorted(src.rglob("*")):
                if item.is_file() and item.name not in (MANIFEST, MANIFEST_SUM, CARD):
                    dest = tmp / item.relative_to(src)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(item, dest)
            for name, path in (extra_files or {}).items():
                dest = tmp / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)
            (tmp / CARD).write_text(render_card(m, card_extra), encoding="utf-8")
            return m.model_dump(mode="json")

        final = publish_dir(self.versions_dir, version, write)
        m = Manifest.model_validate_json((final / MANIFEST).read_text(encoding="utf-8"))
        for alias in aliases:
            self.set_alias(alias, version)
        return Artifact(path=final, manifest=m)

    def set_alias(self, alias: str, version: str) -> None:
        self._check_name(alias)
        if not (self.versions_dir / version / MANIFEST).exists():
            raise ArtifactError(f"cannot point alias {alias!r} at unknown version {version!r}")
        write_atomic(self.aliases_dir / alias, (version + "\n").encode())

    # -- reading -----------------------------------------------------------------------------
    def resolve(self, ref: str) -> str | None:
        """Alias or version name -> version name, or None when it does not exist."""
        alias_file = self.aliases_dir / ref
        if _NAME.match(ref) and alias_file.is_file():
            return alias_file.read_text(encoding="utf-8").strip() or None
        if _NAME.match(ref) and (self.versions_dir / ref / MANIFEST).is_file():
            return ref
        return None

    def versions(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        return sorted(
            p.name
            for p in self.versions_dir.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file()
        )

    def aliases(self) -> dict[str, str]:
        if not self.aliases_dir.is_dir():
            return {}
        return {
            p.name: p.read_text(encoding="utf-8").strip()
            for p in self.aliases_dir.iterdir()
            if p.is_file() and not p.name.startswith(".")
        }

    def load(self, ref: str, verify: bool = True) -> Artifact:
        """A version (by name or alias) after checking every file's sha256 against the manifest."""
        version = self.resolve(ref)
        if version is None:
            raise ArtifactError(f"no model version or alias {ref!r} in {self.root}")
        path = self.versions_dir / version
        raw = _verify(path) if verify else _read_manifest(path)
        try:
            m = Manifest.model_validate(raw)
        except ValueError as exc:
            raise ArtifactError(
                f"{path / MANIFEST}: unreadable manifest ({exc})", MANIFEST
            ) from exc
        return Artifact(path=path, manifest=m)

    @staticmethod
    def _check_name(name: str) -> None:
        if not _NAME.match(name):
            raise ArtifactError(
                f"invalid name {name!r}: use letters, digits, '.', '_' or '-' (max 128)"
            )


def verify_manifest(path: Path) -> None:
    """The manifest's own checksum (``manifest.sha256``): a changed byte in it is refused too."""
    sum_file = path / MANIFEST_SUM
    if not sum_file.is_file():
        raise ArtifactError(
            f"{sum_file}: missing; the version was not published by this store", MANIFEST_SUM
        )
    expected = sum_file.read_text(encoding="utf-8").strip()
    actual = sha256_file(path / MANIFEST) if (path / MANIFEST).is_file() else "missing"
    if actual != expected:
        raise ArtifactError(
            f"{path / MANIFEST}: checksum mismatch with {MANIFEST_SUM}; the "
            "manifest is corrupt or was modified after publish",
            MANIFEST,
        )


def verify_files(path: Path, files: Mapping[str, str]) -> None:
    """Raise :class:`ArtifactError` naming the first file that is missing or changed."""
    if not files:
        raise ArtifactError(f"{path}: manifest lists no files", MANIFEST)
    for rel, digest in sorted(files.items()):
        f = path / rel
        if not f.is_file():
            raise ArtifactError(f"{f}: listed in the manifest but missing", rel)
        actual = sha256_file(f)
        if actual != digest:
            raise ArtifactError(
                f"{f}: checksum mismatch (manifest {digest[:12]}..., file {actual[:12]}...); "
                "the artifact is corrupt or was modified after publish",
                rel,
            )
