"""Artifact integrity: checksums, schema versions, and clear errors that name the file."""

from __future__ import annotations

import json
import shutil

import pytest

from polyreward.models.runtime.artifact import MANIFEST, ArtifactError, find_artifacts, load_manifest
from polyreward.models.runtime.scorer import Scorer


@pytest.fixture
def artifact(tmp_path, export_family):
    """A private copy of the tiny Llama artifact, free to damage."""
    return shutil.copytree(export_family("llama"), tmp_path / "artifact")


def edit_manifest(artifact, change):
    path = artifact / MANIFEST
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def test_intact_artifact_loads(artifact):
    scorer = Scorer(artifact, precision="fp32", device="cpu")
    assert scorer.objectives == ["objective0", "objective1", "objective2"]


@pytest.mark.parametrize("victim", ["model.onnx", "tokenizer/tokenizer.json"])
def test_tampered_file_is_refused_naming_the_file(artifact, victim):
    path = artifact / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"{victim}: checksum mismatch"):
        Scorer(artifact, precision="fp32", device="cpu")


def test_missing_file_is_refused_naming_the_file(artifact):
    (artifact / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"model\.onnx: missing"):
        Scorer(artifact, precision="fp32", device="cpu")


def test_an_artifact_without_groups_records_schema_3_and_no_group_fields(artifact):
    """Only mixture heads need schema 4, so a reader of schema 3 keeps serving every other artifact."""
    raw = json.loads((artifact / MANIFEST).read_text())
    assert raw["schema_version"] == 3
    assert "groups" not in raw["head"] and "routing" not in raw["head"]
    edit_manifest(artifact, lambda m: m["head"].update(kind="mixture", groups=["a", "b"]))
    with pytest.raises(ArtifactError, match=r"schema_version: mixture heads need schema 4"):
        load_manifest(artifact)
    assert "group_calibration" not in raw["head"]


@pytest.mark.parametrize(
    "stats", [{"a": {"mean": 0, "std": 1}}, {"a": {"mean": 0, "std": 1}, "b": {"mean": 0, "std": 0}}]
)
def test_group_calibration_needs_one_positive_std_per_group(artifact, stats):
    head = {"kind": "mixture", "groups": ["a", "b"], "group_calibration": stats}
    edit_manifest(artifact, lambda m: (m["head"].update(head), m.update(schema_version=4)))
    with pytest.raises(ArtifactError, match=r"head\.group_calibration: one mean and positive std per group"):
        load_manifest(artifact)


def test_unknown_schema_version_is_refused_clearly(artifact):
    edit_manifest(artifact, lambda m: m.update(schema_version=99))
    with pytest.raises(
        ArtifactError, match=r"schema_version 99 is not supported .*supported: 1, 2.*upgrade polyreward"
    ):
        load_manifest(artifact)


def test_invalid_manifest_names_the_field(artifact):
    edit_manifest(artifact, lambda m: m["input"].update(max_length="long"))
    with pytest.raises(ArtifactError, match=r"manifest\.json: invalid manifest.*input\.max_length"):
        load_manifest(artifact)


def test_left_padded_encoder_manifest_is_refused(tmp_path, export_family):
    artifact = shutil.copytree(export_family("minilm"), tmp_path / "a")
    edit_manifest(artifact, lambda m: m["input"].update(padding_side="left"))
    with pytest.raises(ArtifactError, match="encoders must be right-padded"):
        load_manifest(artifact)


def test_missing_precision_and_missing_artifact(artifact, tmp_path):
    with pytest.raises(ArtifactError, match="no int8 graph in this artifact"):
        Scorer(artifact, precision="int8", device="cpu")
    with pytest.raises(ArtifactError, match=r"not found — is .* a polyreward artifact directory"):
        load_manifest(tmp_path / "nowhere")


def test_heads_file_is_plain_safetensors_with_config(artifact):
    from safetensors import safe_open

    with safe_open(str(artifact / "heads.safetensors"), framework="np") as f:
        assert "regression.weight" in f.keys()  # noqa: SIM118 - safe_open is not a dict
        assert json.loads(f.metadata()["polyreward.heads"])["kind"] == "moe"


def test_unknown_device_or_precision_names_the_option(artifact):
    from polyreward.models.runtime.errors import PolyrewardError

    with pytest.raises(PolyrewardError, match="device: 'gpu' is not one of auto, cpu, cuda, tensorrt"):
        Scorer(artifact, device="gpu")
    with pytest.raises(
        PolyrewardError, match="precision: 'bf16' is not one of auto, fp32, int8, int8-dynamic, fp16"
    ):
        Scorer(artifact, precision="bf16")


def test_an_exported_artifact_has_the_modes_of_the_umask(export_family):
    """Staging uses mkdtemp (0700) and safetensors writes 0600; a server running as another user (a container
    mounting the artifact) must still be able to read it."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    root = export_family("llama")
    assert root.stat().st_mode & 0o777 == 0o777 & ~umask
    for p in root.rglob("*"):
        assert p.stat().st_mode & 0o777 == (0o777 if p.is_dir() else 0o666) & ~umask, p


def test_find_artifacts_in_a_model_volume(artifact, tmp_path):
    """`serve /models`: an artifact itself, or every artifact one level down, by name; nothing is an error."""
    assert find_artifacts(artifact) == [artifact]
    for name in ("b-model", "a-model"):
        shutil.copytree(artifact, tmp_path / "volume" / name)
    (tmp_path / "volume" / "lost+found").mkdir()
    assert find_artifacts(tmp_path / "volume") == [
        tmp_path / "volume" / "a-model",
        tmp_path / "volume" / "b-model",
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match=r"empty: no manifest.json in it or in its subdirectories"):
        find_artifacts(tmp_path / "empty")
    with pytest.raises(ArtifactError, match="nowhere: not found"):
        find_artifacts(tmp_path / "nowhere")
