"""Model store: atomic publish, aliases, checksum-verified loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from model_store import ArtifactError, Manifest, ModelStore, library_versions, sha256_file
from model_store.store import MANIFEST


def _src(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "tokenizer").mkdir(parents=True, exist_ok=True)
    (src / "model.safetensors").write_bytes(b"\x00weights\x01" * 100)
    (src / "config.json").write_text('{"hidden_size": 8}')
    (src / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    return src


def _manifest(**kw: Any) -> dict[str, Any]:
    m: dict[str, Any] = {
        "base_model": "minilm-l6",
        "pooling": "mean",
        "dim": 8,
        "template": {"max_items": 20},
        "metrics": {"eval": {"recall@10": 0.5}},
        "config": {"lr": 1e-4},
        "data_hash": "abc123",
        "parent": "v0",
    }
    m.update(kw)
    return m


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


def test_publish_then_load_round_trip(store: ModelStore, tmp_path: Path) -> None:
    src = _src(tmp_path)
    art = store.publish(src, _manifest(version="v1"))
    assert art.version == "v1" and art.path == store.versions_dir / "v1"
    loaded = store.load("v1")
    assert loaded.manifest == art.manifest
    for rel in ("model.safetensors", "config.json", "tokenizer/vocab.txt"):
        assert (loaded.path / rel).read_bytes() == (src / rel).read_bytes()
    assert store.versions() == ["v1"]


def test_manifest_fields_and_library_versions(store: ModelStore, tmp_path: Path) -> None:
    art = store.publish(_src(tmp_path), _manifest(version="v1", library_versions={"custom": "1.2"}))
    on_disk = json.loads((art.path / MANIFEST).read_text())
    m = Manifest.model_validate(on_disk)
    assert m.base_model == "minilm-l6" and m.pooling == "mean" and m.dim == 8
    assert m.parent == "v0" and m.data_hash == "abc123"
    assert m.metrics == {"eval": {"recall@10": 0.5}} and m.config == {"lr": 1e-4}
    assert m.library_versions["custom"] == "1.2"
    for lib in ("python", "torch", "transformers", "numpy"):
        assert m.library_versions[lib] == library_versions()[lib]
    # Every file but the manifest itself is checksummed, the model card included.
    assert set(m.files) == {"model.safetensors", "config.json", "tokenizer/vocab.txt", "README.md"}
    for rel, digest in m.files.items():
        assert sha256_file(art.path / rel) == digest
    card = (art.path / "README.md").read_text()
    assert "`v1`" in card and "minilm-l6" in card and "eval/recall@10" in card


def test_version_name_generated_when_omitted(store: ModelStore, tmp_path: Path) -> None:
    art = store.publish(_src(tmp_path), _manifest())
    assert art.version.startswith("v") and store.resolve("latest") == art.version


def test_aliases_move(store: ModelStore, tmp_path: Path) -> None:
    src = _src(tmp_path)
    store.publish(src, _manifest(version="v1"), aliases=("latest", "production"))
    assert store.aliases() == {"latest": "v1", "production": "v1"}
    store.publish(src, _manifest(version="v2"))  # default: latest only
    assert store.aliases() == {"latest": "v2", "production": "v1"}
    assert store.load("production").version == "v1"
    assert store.load("latest").version == "v2"
    store.set_alias("production", "v2")
    assert store.load("production").version == "v2"
    # Moved by rename: no temp files left beside the aliases.
    assert sorted(p.name for p in store.aliases_dir.iterdir()) == ["latest", "production"]
    with pytest.raises(ArtifactError, match="unknown version"):
        store.set_alias("production", "v9")
    assert store.resolve("production") == "v2"


def test_existing_version_refused(store: ModelStore, tmp_path: Path) -> None:
    store.publish(_src(tmp_path), _manifest(version="v1"))
    with pytest.raises(ArtifactError, match="already exists"):
        store.publish(_src(tmp_path), _manifest(version="v1"))


@pytest.mark.parametrize(
    "rel", ["model.safetensors", "config.json", "tokenizer/vocab.txt", "README.md"]
)
def test_changed_byte_is_refused_naming_the_file(
    store: ModelStore, tmp_path: Path, rel: str
) -> None:
    art = store.publish(_src(tmp_path), _manifest(version="v1"))
    f = art.path / rel
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError) as ei:
        store.load("latest")
    assert ei.value.file == rel
    assert rel in str(ei.value) and "checksum mismatch" in str(ei.value)
    # verify=False is the explicit escape hatch.
    assert store.load("v1", verify=False).version == "v1"


def test_missing_file_and_corrupt_manifest(store: ModelStore, tmp_path: Path) -> None:
    art = store.publish(_src(tmp_path), _manifest(version="v1"))
    (art.path / "config.json").unlink()
    with pytest.raises(ArtifactError, match="missing") as ei:
        store.load("v1")
    assert ei.value.file == "config.json"
    (art.path / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="manifest") as ei2:
        store.load("v1")
    assert ei2.value.file == MANIFEST


def test_unknown_ref(store: ModelStore) -> None:
    assert store.resolve("production") is None
    with pytest.raises(ArtifactError, match="no model version or alias"):
        store.load("production")


@pytest.mark.parametrize("bad", ["../escape", "a/b", ".hidden", "sp ace", "x" * 200])
def test_invalid_names_refused(store: ModelStore, tmp_path: Path, bad: str) -> None:
    src = _src(tmp_path)
    with pytest.raises(ArtifactError, match="invalid name"):
        store.publish(src, _manifest(version=bad))
    store.publish(src, _manifest(version="ok1"))
    with pytest.raises(ArtifactError, match="invalid name"):
        store.set_alias(bad, "ok1")
    assert store.resolve(bad) is None
    assert store.versions() == ["ok1"]


def test_empty_alias_refused(store: ModelStore, tmp_path: Path) -> None:
    store.publish(_src(tmp_path), _manifest(version="v1"))
    with pytest.raises(ArtifactError, match="invalid name"):
        store.set_alias("", "v1")


def test_invalid_alias_refused_before_anything_is_written(
    store: ModelStore, tmp_path: Path
) -> None:
    with pytest.raises(ArtifactError, match="invalid name"):
        store.publish(_src(tmp_path), _manifest(version="v1"), aliases=("latest", "bad/alias"))
    assert store.versions() == []
    assert store.aliases() == {}


def _leftovers(store: ModelStore) -> list[str]:
    if not store.versions_dir.exists():
        return []
    return sorted(p.name for p in store.versions_dir.iterdir())


def test_failed_publish_leaves_no_version_dir(store: ModelStore, tmp_path: Path) -> None:
    src = _src(tmp_path)
    bad = _manifest(version="v1")
    del bad["dim"]  # the manifest fails validation after the files were copied
    with pytest.raises(ValueError):
        store.publish(src, bad)
    assert _leftovers(store) == []
    with pytest.raises(FileNotFoundError):
        store.publish(src, _manifest(version="v2"), extra_files={"x.bin": tmp_path / "nope"})
    assert _leftovers(store) == []
    assert store.aliases() == {}
    with pytest.raises(ArtifactError, match="not a directory"):
        store.publish(tmp_path / "absent", _manifest(version="v3"))


def test_source_manifest_and_card_are_regenerated(store: ModelStore, tmp_path: Path) -> None:
    src = _src(tmp_path)
    (src / MANIFEST).write_text('{"stale": true}')
    (src / "README.md").write_text("stale card")
    art = store.publish(src, _manifest(version="v1"))
    assert "stale" not in (art.path / "README.md").read_text()
    assert store.load("v1").manifest.dim == 8


def test_changed_byte_in_manifest_is_refused(tmp_path):
    """The manifest cannot list its own checksum; manifest.sha256 beside it catches edits."""
    from model_store import ArtifactError, ModelStore

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    store = ModelStore(tmp_path / "store")
    art = store.publish(src, {"version": "v1", "base_model": "b", "pooling": "mean", "dim": 4})
    store.load("v1")
    mpath = art.path / "manifest.json"
    text = mpath.read_text()
    mpath.write_text(text.replace('"pooling": "mean"', '"pooling": "last"'))
    with pytest.raises(ArtifactError) as err:
        store.load("latest")
    assert err.value.file == "manifest.json"


def test_publish_dir_and_verify_are_the_one_primitive(tmp_path: Path) -> None:
    """What the store and the service's index snapshots both write: a whole directory or none,
    with a manifest listing every file's sha256 and its own checksum beside it."""
    from model_store import publish_dir, verify, write_atomic

    def write(tmp: Path) -> dict[str, object]:
        (tmp / "a.bin").write_bytes(b"alpha")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("beta")
        return {"kind": "test"}

    path = publish_dir(tmp_path, "v1", write)
    manifest = verify(path)
    assert manifest["kind"] == "test" and set(manifest["files"]) == {"a.bin", "sub/b.txt"}
    with pytest.raises(ArtifactError, match="already exists"):
        publish_dir(tmp_path, "v1", write)
    (path / "sub" / "b.txt").write_text("BETA")
    with pytest.raises(ArtifactError) as err:
        verify(path)
    assert err.value.file == "sub/b.txt"

    def boom(tmp: Path) -> dict[str, object]:
        (tmp / "half").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError):
        publish_dir(tmp_path, "v2", boom)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"]  # nothing half-written left
    write_atomic(tmp_path / "CURRENT", b"v1\n")
    assert (tmp_path / "CURRENT").read_bytes() == b"v1\n"


def test_a_loader_refuses_files_the_manifest_does_not_cover(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"w")
    art = ModelStore(tmp_path / "store").publish(src, _manifest())
    art.require(["w.bin"])
    with pytest.raises(ArtifactError, match="not listed in the manifest") as err:
        art.require(["w.bin", "hier/extra.bin"])
    assert err.value.file == "hier/extra.bin"
