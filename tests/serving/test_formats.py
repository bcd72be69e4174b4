"""The one rule of the versioned formats (serving.format.FormatModel) for the bundle manifest and the class state:
unknown keys -> one warning naming them, the file still loads; a newer major version -> a refusal naming the found
and the newest known version and what to do. Also: fixture bundles are built through the writer."""
from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from serving import format as format_mod
from serving.bundle import load_bundle
from serving.classes import STATE_FILE, ClassRegistry, ClassStateError
from serving.errors import BundleError
from serving.format import CLASS_STATE_FORMAT_VERSION, KNOWN_MANIFEST_KEYS, MANIFEST_FILE, READER_VERSION
from serving.manifest import BundleManifest, read_manifest, write_manifest
from serving.tokenizer import ClipTokenizer, default_vocab_path


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(format_mod, "_warned_unknown", set())


def _unknown_key_warnings(caplog, key: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and key in r.getMessage()
            and "does not know" in r.getMessage()]


# -- bundle manifest -------------------------------------------------------------------------------


def test_fixture_bundle_is_built_through_the_writer_and_loads(synthetic_bundle, build_manifest, caplog):
    with caplog.at_level(logging.WARNING):
        b = load_bundle(synthetic_bundle.path)
    assert not [r for r in caplog.records if "does not know" in r.getMessage()]
    # What the writer got is what the reader reads.
    assert b.model == build_manifest(synthetic_bundle.path, synthetic_bundle.class_names)
    assert b.model.to_json() == b.manifest == json.loads((synthetic_bundle.path / MANIFEST_FILE).read_text())
    assert "prompt_sets" not in b.manifest  # format 1: the optional object is left out, not written as null


def test_known_manifest_keys_are_the_model_fields():
    assert KNOWN_MANIFEST_KEYS == {f.name for f in dataclasses.fields(BundleManifest)}


def test_writer_refuses_a_manifest_the_reader_would_refuse(bundle_copy, build_manifest):
    manifest = dataclasses.replace(build_manifest(bundle_copy, ["cat", "dog"]), logit_scale=-1.0)
    with pytest.raises(BundleError, match="refusing to write .*logit_scale must be a positive finite number"):
        write_manifest(bundle_copy, manifest)


def test_unknown_manifest_keys_at_any_level_warn_once_and_load(synthetic_bundle, bundle_copy, edit_manifest, caplog):
    def edit(m):
        m["future_thing"] = 1
        m["text"]["future_text_option"] = "x"
        m["graphs"]["text"][0]["future_graph_key"] = [1]
        m["preprocessing"]["future_crop"] = 0.9

    edit_manifest(bundle_copy, edit)
    with caplog.at_level(logging.WARNING):
        first = load_bundle(bundle_copy)
        load_bundle(bundle_copy)
    for key in ("future_thing", "text.future_text_option", "graphs.text[0].future_graph_key",
                "preprocessing.future_crop"):
        assert len(_unknown_key_warnings(caplog, key)) == 1, key
    assert first.class_names == synthetic_bundle.class_names and first.manifest["future_thing"] == 1
    assert not hasattr(first.model, "future_thing")
    assert len([r for r in caplog.records if "future_crop" in r.getMessage()]) == 1  # no second warning elsewhere


def test_missing_preprocessing_key_is_named(bundle_copy, edit_manifest):
    edit_manifest(bundle_copy, lambda m: m["preprocessing"].pop("std"))
    with pytest.raises(BundleError, match=r"missing required key\(s\): preprocessing\.std.*re-export"):
        load_bundle(bundle_copy)


def test_newer_bundle_is_refused_naming_both_versions_and_what_to_do(bundle_copy, edit_manifest):
    newer = READER_VERSION + 7
    edit_manifest(bundle_copy, lambda m: m.update(min_reader_version=newer, format_version=newer))
    with pytest.raises(BundleError) as info:
        read_manifest(bundle_copy)
    msg = str(info.value)
    assert f"bundle reader version {newer}" in msg
    assert f"reads up to bundle reader version {READER_VERSION}" in msg
    assert "upgrade promptclip" in msg and "re-export" in msg


def test_non_int_reader_version_is_invalid(bundle_copy, edit_manifest):
    edit_manifest(bundle_copy, lambda m: m.update(min_reader_version="2"))
    with pytest.raises(BundleError, match="min_reader_version must be a positive int.*re-export"):
        load_bundle(bundle_copy)


def test_nested_object_of_the_wrong_type_is_named(bundle_copy, edit_manifest):
    edit_manifest(bundle_copy, lambda m: m.update(text=["not", "an", "object"]))
    with pytest.raises(BundleError, match="text must be a JSON object, got list.*re-export"):
        load_bundle(bundle_copy)


# -- class state -----------------------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path):
    tokenizer = ClipTokenizer(default_vocab_path())

    def make() -> ClassRegistry:
        return ClassRegistry(tmp_path, ["cat", "dog"], tokenizer=tokenizer, template="a photo of a {}.")

    return make


def test_class_state_unknown_keys_warn_once_and_load(registry, tmp_path, caplog):
    registry()
    path = tmp_path / STATE_FILE
    state = json.loads(path.read_text())
    path.write_text(json.dumps({**state, "names": ["cat", "dog", "zebra"], "future_owner": "worker-3"}))
    with caplog.at_level(logging.WARNING):
        reg = registry()
        registry()
    assert reg.names() == ["cat", "dog", "zebra"]
    assert len(_unknown_key_warnings(caplog, "future_owner")) == 1
    reg.add(["lion"])  # rewritten through the model: the unknown key is not carried over
    assert set(json.loads(path.read_text())) == {"format", "format_version", "version", "names"}


def test_newer_class_state_is_refused_naming_both_versions_and_kept(registry, tmp_path):
    path = tmp_path / STATE_FILE
    content = json.dumps({"format": "promptclip.classes", "format_version": CLASS_STATE_FORMAT_VERSION + 1,
                          "version": 1, "names": ["cat"], "owner": "new"})
    path.write_text(content)
    with pytest.raises(ClassStateError) as info:
        registry()
    msg = str(info.value)
    assert f"class state format version {CLASS_STATE_FORMAT_VERSION + 1}" in msg
    assert f"reads up to class state format version {CLASS_STATE_FORMAT_VERSION}" in msg
    assert "upgrade promptclip" in msg and "move it away" in msg
    assert path.read_text() == content
