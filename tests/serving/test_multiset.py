"""Bundle format 2 (several prompt sets + per-image expert weights) through bundle, runtime and classifier.

Every number is checked against a direct numpy recomputation from the torch modules of the
``multiset_bundle`` fixture: ``logit_scale * sum_k w[b, k] * (f[b] . T_k[c])``.
"""
from __future__ import annotations

import numpy as np
import pytest

from serving.bundle import load_bundle, load_class_embeddings
from serving.classifier import Classifier
from serving.errors import BundleError, ClassNameError
from serving.format import EXPERT_WEIGHTS_OUTPUT, IMAGE_GRAPH_FILE, MULTI_SET_FORMAT_VERSION
from serving.preprocess import decode_image, preprocess
from serving.runtime import OrtRuntime, Runtime, create_runtime

LOGIT_SCALE = 50.0


@pytest.fixture(scope="module")
def mclf(multiset_bundle) -> Classifier:
    return Classifier.from_bundle(multiset_bundle.path)


@pytest.fixture
def fresh_mclf(multiset_bundle, tmp_path) -> Classifier:
    return Classifier.from_bundle(multiset_bundle.path, state_dir=tmp_path / "state", verify_hashes=False)


def _pixels(multiset_bundle, images) -> np.ndarray:
    return preprocess(images, load_bundle(multiset_bundle.path, verify_hashes=False).preprocessing)


def _expected_logits(multiset_bundle, images, names) -> np.ndarray:
    """``[B, C]`` logits recomputed from the torch modules (float64)."""
    feats, weights = multiset_bundle.image_embed(_pixels(multiset_bundle, images))
    per_set = np.stack([feats.astype(np.float64) @ multiset_bundle.text_embed(names, k).T.astype(np.float64)
                        for k in range(len(multiset_bundle.templates))], axis=1)  # [B, S, C]
    return LOGIT_SCALE * np.einsum("bs,bsc->bc", weights.astype(np.float64), per_set)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _check_rows(results, expected: np.ndarray, names: list[str]) -> None:
    """Every image's logits and scores, matched by name, equal ``expected`` (and its softmax)."""
    assert len(results) == len(expected)
    for row, exp, probs in zip(results, expected, _softmax(expected)):
        assert len(row) == len(names)
        got = {r["name"]: r for r in row}
        np.testing.assert_allclose([got[n]["logit"] for n in names], exp, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose([got[n]["score"] for n in names], probs, rtol=1e-5, atol=1e-4)
        assert [r["name"] for r in row] == [names[j] for j in np.argsort(-exp, kind="stable")]


# -- bundle ----------------------------------------------------------------------------------------


def test_multiset_bundle_loads(multiset_bundle, synthetic_bundle):
    b = load_bundle(multiset_bundle.path)
    assert b.manifest["format_version"] == MULTI_SET_FORMAT_VERSION
    assert b.num_prompt_sets == 3
    assert b.prompt_set_names == ["photo", "sketch", "art"]
    assert b.templates == multiset_bundle.templates
    assert [b.graph_path("text", k).name for k in range(3)] == [f"text_encoder_{k}.onnx" for k in range(3)]
    tables = load_class_embeddings(b)
    assert len(tables) == 3
    for k, table in enumerate(tables):
        np.testing.assert_allclose(table, multiset_bundle.text_embed(multiset_bundle.class_names, k), atol=1e-6)
    assert not np.allclose(tables[0], tables[1], atol=1e-2)  # the sets really differ
    single = load_bundle(synthetic_bundle.path, verify_hashes=False)
    assert single.prompt_set_names == ["default"] and single.manifest["min_reader_version"] == 1


def _drop_expert_weights(m: dict) -> None:
    m["graphs"]["image"]["outputs"] = [o for o in m["graphs"]["image"]["outputs"] if o["name"] != "expert_weights"]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.pop("prompt_sets"), r"prompt_sets is missing.*3 prompt sets"),
        (lambda m: m["prompt_sets"].update(combine="mean"), r"prompt_sets\.combine is 'mean'.*'weighted_sum'"),
        (lambda m: m["prompt_sets"].pop("combine"), r"prompt_sets\.combine is None"),
        (lambda m: m["prompt_sets"].update(names=["photo", "sketch"]), r"prompt_sets\.names must be a list of 3"),
        (lambda m: m["prompt_sets"].update(names=["photo", "", "art"]), r"prompt_sets\.names must be a list of 3"),
        (lambda m: m["prompt_sets"].update(names="photo"), r"prompt_sets\.names must be a list of 3"),
        (lambda m: m["prompt_sets"].update(names=["photo", "art", "art"]), r"prompt_sets\.names has duplicates"),
        (lambda m: m.update(prompt_sets=["photo", "sketch", "art"]), r"prompt_sets must be a JSON object"),
        (_drop_expert_weights, r"graphs\.image\.outputs has no output named 'expert_weights'"),
    ],
)
def test_malformed_multiset_manifest_is_refused(multiset_copy, edit_manifest, edit, match):
    edit_manifest(multiset_copy, edit)
    with pytest.raises(BundleError, match=match) as info:
        load_bundle(multiset_copy, verify_hashes=False)
    assert "re-export" in str(info.value)


def test_too_new_multiset_bundle_is_refused(multiset_copy, edit_manifest):
    edit_manifest(multiset_copy, lambda m: m.update(min_reader_version=3, format_version=3))
    with pytest.raises(BundleError, match="reader version 3.*upgrade promptclip"):
        load_bundle(multiset_copy)


def test_single_set_bundle_needs_no_prompt_sets_but_checks_one_given(bundle_copy, edit_manifest):
    load_bundle(bundle_copy, verify_hashes=False)  # no prompt_sets, no expert_weights output
    edit_manifest(bundle_copy, lambda m: m.update(prompt_sets={"names": ["only"], "combine": "weighted_sum"}))
    assert load_bundle(bundle_copy, verify_hashes=False).prompt_set_names == ["only"]
    edit_manifest(bundle_copy, lambda m: m.update(prompt_sets={"names": ["a", "b"], "combine": "weighted_sum"}))
    with pytest.raises(BundleError, match=r"prompt_sets\.names must be a list of 1"):
        load_bundle(bundle_copy, verify_hashes=False)


# -- runtime ---------------------------------------------------------------------------------------


def test_run_image_and_weights_matches_torch(multiset_bundle):
    rt = create_runtime(load_bundle(multiset_bundle.path, verify_hashes=False))
    assert isinstance(rt, Runtime)
    pixels = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    embeds, weights = rt.run_image_and_weights(pixels)
    assert embeds.shape == (4, 32) and weights.shape == (4, 3)
    assert embeds.dtype == np.float32 and weights.dtype == np.float32
    exp_embeds, exp_weights = multiset_bundle.image_embed(pixels)
    np.testing.assert_allclose(embeds, exp_embeds, atol=1e-5)
    np.testing.assert_allclose(weights, exp_weights, atol=1e-5)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
    assert weights.min() >= 0.0
    np.testing.assert_allclose(rt.run_image(pixels), embeds, atol=1e-6)
    # The fixture is useful only if the weights are far from uniform and differ between images.
    assert np.ptp(weights, axis=1).min() > 0.05 and np.ptp(weights, axis=0).max() > 0.05


def test_run_image_and_weights_single_set_gives_ones(synthetic_bundle):
    rt = create_runtime(load_bundle(synthetic_bundle.path, verify_hashes=False))
    pixels = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    embeds, weights = rt.run_image_and_weights(pixels)
    np.testing.assert_array_equal(embeds, rt.run_image(pixels))
    assert weights.dtype == np.float32
    np.testing.assert_array_equal(weights, np.ones((3, 1), dtype=np.float32))
    with pytest.raises(ValueError, match="non-empty"):
        rt.run_image_and_weights(np.zeros((0, 3, 32, 32), dtype=np.float32))


def test_runtime_refuses_an_image_graph_without_expert_weights(multiset_copy, synthetic_bundle):
    # The manifest declares expert_weights, the (single-set) graph has no such output.
    (multiset_copy / IMAGE_GRAPH_FILE).write_bytes((synthetic_bundle.path / IMAGE_GRAPH_FILE).read_bytes())
    b = load_bundle(multiset_copy, verify_hashes=False)
    with pytest.raises(BundleError, match="no output 'expert_weights'.*re-export"):
        OrtRuntime(b)


def test_runtime_refuses_expert_weights_of_the_wrong_width(multiset_copy, edit_manifest):
    # A consistent 2-set manifest over an image graph whose expert_weights are [N, 3].
    def edit(m):
        m["method"]["capabilities"]["num_prompt_sets"] = 2
        m["text"]["templates"] = m["text"]["templates"][:2]
        m["graphs"]["text"] = m["graphs"]["text"][:2]
        m["prompt_sets"]["names"] = m["prompt_sets"]["names"][:2]
        for out in m["graphs"]["image"]["outputs"]:
            if out["name"] == EXPERT_WEIGHTS_OUTPUT:
                out["shape"] = ["N", 2]

    edit_manifest(multiset_copy, edit)
    b = load_bundle(multiset_copy, verify_hashes=False)
    with pytest.raises(BundleError, match=r"output 'expert_weights' has shape .*\[batch, num_prompt_sets\]"):
        OrtRuntime(b)


# -- classifier ------------------------------------------------------------------------------------


def test_classify_combines_the_prompt_sets_like_torch(mclf, multiset_bundle, pil_image):
    images = [pil_image(0), pil_image(1, size=(20, 64)), pil_image(2, size=(100, 30))]
    names = multiset_bundle.class_names
    results = mclf.classify(images, top_k=len(names))
    expected = _expected_logits(multiset_bundle, images, names)
    _check_rows(results, expected, names)
    for row in results:
        assert sum(r["score"] for r in row) == pytest.approx(1.0, abs=1e-6)
    # The weighting matters: neither one set alone nor a plain average gives these numbers.
    feats, _ = multiset_bundle.image_embed(_pixels(multiset_bundle, images))
    per_set = [LOGIT_SCALE * feats @ multiset_bundle.text_embed(names, k).T for k in range(3)]
    assert all(np.abs(expected - p).max() > 1e-2 for p in [*per_set, sum(per_set) / 3])


def test_added_class_is_encoded_by_every_prompt_set(fresh_mclf, multiset_bundle, pil_image):
    out = fresh_mclf.add_classes(["zebra"])
    assert out == {"added": ["zebra"], "version": 2, "num_classes": 7, "source": "text", "num_images": 0}
    encoded = fresh_mclf.encode_text(["zebra", "cat"])
    assert encoded.shape == (2, 3, 32)
    for k in range(3):
        np.testing.assert_allclose(encoded[:, k], multiset_bundle.text_embed(["zebra", "cat"], k), atol=1e-5)
        one = fresh_mclf.encode_text(["zebra"], prompt_set=k)
        assert one.shape == (1, 32)
        np.testing.assert_allclose(one[0], encoded[0, k], atol=1e-6)
    with pytest.raises(IndexError, match="0..2"):
        fresh_mclf.encode_text(["zebra"], prompt_set=3)
    images = [pil_image(5), pil_image(6)]
    names = [*multiset_bundle.class_names, "zebra"]
    results = fresh_mclf.classify(images, top_k=len(names))
    _check_rows(results, _expected_logits(multiset_bundle, images, names), names)


def test_adhoc_classes_use_every_prompt_set(mclf, multiset_bundle, pil_image):
    images = [pil_image(3), pil_image(4)]
    names = ["zebra", "cat", "fire truck", "blue whale"]
    results = mclf.classify(images, top_k=4, class_names=[" zebra", "cat", "fire  truck", "blue whale"])
    _check_rows(results, _expected_logits(multiset_bundle, images, names), names)
    assert mclf.registry.names() == multiset_bundle.class_names


def test_scores_are_per_image(mclf, multiset_bundle, pil_image):
    a = pil_image(7, size=(60, 50))
    alone = mclf.classify([a], top_k=6)[0]
    batches = [([pil_image(8), a, pil_image(9, size=(30, 90))], 1), ([a, *(pil_image(s) for s in range(4))], 0)]
    for batch, pos in batches:
        in_batch = mclf.classify(batch, top_k=6)[pos]
        assert [r["name"] for r in in_batch] == [r["name"] for r in alone]
        np.testing.assert_allclose([r["logit"] for r in in_batch], [r["logit"] for r in alone], atol=1e-5)
        np.testing.assert_allclose([r["score"] for r in in_batch], [r["score"] for r in alone], atol=1e-6)


def test_names_are_validated_against_the_longest_template(fresh_mclf, synthetic_bundle):
    # "a photo of a {}." leaves 70 tokens for a name, "a blurry sketch of a {}." only 69.
    assert fresh_mclf.registry.template == "a blurry sketch of a {}."
    with pytest.raises(ClassNameError, match="blurry sketch"):
        fresh_mclf.add_classes([" ".join(["x"] * 70)])
    assert fresh_mclf.add_classes([" ".join(["x"] * 69)])["num_classes"] == 7
    single = Classifier.from_bundle(synthetic_bundle.path, verify_hashes=False)
    assert single.add_classes([" ".join(["x"] * 70)])["num_classes"] == 7


def test_info_names_the_prompt_sets(mclf, synthetic_bundle):
    info = mclf.info()
    assert info["num_prompt_sets"] == 3 and info["prompt_sets"] == ["photo", "sketch", "art"]
    single = Classifier.from_bundle(synthetic_bundle.path, verify_hashes=False, warmup=False).info()
    assert single["num_prompt_sets"] == 1 and single["prompt_sets"] == ["default"]


def test_single_set_encode_text_keeps_its_shape(synthetic_bundle):
    clf = Classifier.from_bundle(synthetic_bundle.path, verify_hashes=False, warmup=False)
    out = clf.encode_text(["zebra", "cat"])
    assert out.shape == (2, 32)
    np.testing.assert_array_equal(out, clf.encode_text(["zebra", "cat"], prompt_set=0))
    np.testing.assert_allclose(out, synthetic_bundle.text_embed(["zebra", "cat"]), atol=1e-5)


def test_classify_bytes_on_multiset(mclf, multiset_bundle, image_bytes):
    blob = image_bytes(11, fmt="JPEG")
    (row,) = mclf.classify_bytes([blob], top_k=6)
    _check_rows([row], _expected_logits(multiset_bundle, [decode_image(blob)], multiset_bundle.class_names),
                multiset_bundle.class_names)
