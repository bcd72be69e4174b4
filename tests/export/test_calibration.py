"""Export writes open-set calibration: held-out images through the exported image graph, as the service sees them."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from export.bundle import export_bundle
from serving.bundle import load_bundle
from serving.classifier import Classifier
from serving.errors import BundleError
from training.errors import ExportError


@pytest.fixture(scope="module")
def zeroshot_run(tmp_path_factory):
    """zeroshot (nothing to train) on a shapes set with 4 held-out test images per class, trained on all classes."""
    from promptclip_testing import TINY, make_shapes, tiny_method_config
    from training.engine import TrainConfig
    from training.workflow import train_run

    root = tmp_path_factory.mktemp("cal-shapes")
    make_shapes(root, train_per_class=2, test_per_class=4, size=32, seed=3)
    cfg = TrainConfig(epochs=1, max_steps=1, batch_size=8, precision="fp32", device="cpu", seed=1)
    run = train_run(method_name="zeroshot", data_root=root, out_dir=tmp_path_factory.mktemp("cal-run"),
                    backbone_name=TINY, method_config=tiny_method_config("zeroshot"), train_config=cfg, shots=2,
                    subsample="all", evaluate_splits=False, progress=False)
    return run.artifact, root


def test_export_writes_calibration_the_service_reproduces(zeroshot_run, tmp_path):
    artifact, root = zeroshot_run
    out = export_bundle(artifact, tmp_path / "b", exporter="torchscript", calibration=root, keep_rate=0.9,
                        open_set_rule="msp", calibration_per_class=3, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    cal_info = manifest["calibration"]
    assert cal_info["file"] == "calibration.npz" and cal_info["num_images"] == 8 * 3
    assert cal_info["num_classes"] == 8 and cal_info["keep_rate"] == 0.9 and cal_info["default_rule"] == "msp"
    bundle = load_bundle(out)
    cal = bundle.calibration
    assert cal.image_embeds.shape == (1, 24, bundle.embedding_dim) and cal.weights is None
    assert sorted(np.bincount(cal.labels).tolist()) == [3] * 8
    # the same image classified by the service has exactly the calibration embedding (same decode, same graph)
    clf = Classifier.from_bundle(out)
    from export.calibration import pick, samples_from_folder
    from serving.preprocess import decode_image, preprocess

    picked = pick(samples_from_folder(root), bundle.class_names, per_class=3)
    path, label = picked[5]
    live = clf.runtime.run_image(preprocess([decode_image(open(path, "rb").read())], bundle.preprocessing))
    np.testing.assert_allclose(live[0], cal.image_embeds[0, 5], atol=1e-6)
    assert cal.labels[5] == label
    (out / "calibration.npz").write_bytes((out / "calibration.npz").read_bytes()[:-10])
    with pytest.raises(BundleError, match="calibration.npz"):
        load_bundle(out)


def test_auto_uses_the_recorded_data_root_and_none_warns(zeroshot_run, tmp_path, caplog):
    from export.calibration import resolve_samples

    artifact, root = zeroshot_run
    caplog.set_level(logging.INFO)
    auto = export_bundle(artifact, tmp_path / "auto", exporter="torchscript", calibration="auto", progress=False)
    assert f"the artifact's data root {root.resolve()}" in caplog.text
    assert load_bundle(auto).calibration.num_images == 8 * 4
    for source, recorded in ((None, str(root)), ("auto", str(tmp_path / "moved-away")), ("auto", None)):
        caplog.clear()
        assert resolve_samples(source, recorded) is None
        assert "no open-set calibration" in caplog.text and "will be null" in caplog.text
    # an export without calibration has no section and loads as before (open-set answers null): the session's
    # bundles (tests/conftest.py) are exported so


def test_bad_calibration_inputs_are_refused_before_export(zeroshot_run, tmp_path):
    artifact, root = zeroshot_run
    with pytest.raises(ExportError, match="--keep-rate"):
        export_bundle(artifact, tmp_path / "x", exporter="torchscript", calibration=root, keep_rate=1.5)
    with pytest.raises(ExportError, match="none of the calibration images"):
        export_bundle(artifact, tmp_path / "x", exporter="torchscript", calibration=[("a.png", "zebra")])
    with pytest.raises(ExportError, match="does not exist"):
        export_bundle(artifact, tmp_path / "x", exporter="torchscript", calibration=tmp_path / "nowhere")
    assert not (tmp_path / "x").exists()


def test_an_image_of_no_listed_class_is_none_of_these_on_the_toy_bundle(tmp_path):
    """toy-clip zero-shot on 4 clean toy-world classes, calibrated on their held-out images: a uniform grey image and
    images of a class left out of the list are answered none_of_these; held-out images of listed classes mostly
    are not."""
    import io

    from PIL import Image

    from promptclip_testing import toy_zeroshot_bundle
    from training.toyworld import world

    known = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "star")]
    out, splits = toy_zeroshot_bundle(tmp_path, known, test_per_class=10)
    left_out = world.write_style_dataset(tmp_path / "left-out", "clean", classes=[("purple", "hexagon")],
                                         train_per_class=1, test_per_class=4, seed=0)
    clf = Classifier.from_bundle(out)
    assert clf.bundle.calibration.num_images == 40
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (128, 128, 128)).save(buf, format="PNG")
    unknown = [buf.getvalue()] + [open(s.path, "rb").read() for s in left_out.test]
    for rule in ("max_cosine", "msp"):
        r = clf.classify_bytes_detailed(unknown, open_set_rule=rule, keep_rate=0.9, top_k=1)
        assert r.none_of_these[0] is True, (rule, r.predictions[0])  # grey
        assert sum(r.none_of_these[1:]) >= 3, (rule, r.none_of_these)  # the left-out class
    known_test = [open(s.path, "rb").read() for s in splits.test]
    kept = clf.classify_bytes_detailed(known_test, keep_rate=0.9, top_k=1).none_of_these
    assert sum(not u for u in kept) == 36  # the calibration images themselves: exactly 90% kept


def test_many_classes_lower_the_per_class_cap_to_fit_the_total():
    """A 1,000-class export must not embed 50 images per class: the per-class cap drops to fit max_images (seeded,
    at least one per class), and a list within the total keeps the per-class cap."""
    from export.calibration import pick

    names = [f"class {i}" for i in range(40)]
    samples = [(f"/d/{n}/{j}.png", n) for n in names for j in range(20)]
    few = pick(samples, names, per_class=10, max_images=100)
    assert len(few) == 80 and sorted({label for _, label in few}) == list(range(40))  # 100 // 40 = 2 per class
    assert few == pick(samples, names, per_class=10, max_images=100)  # seeded
    assert len(pick(samples, names, per_class=10, max_images=10)) == 40  # never fewer than one per class
    assert len(pick(samples, names, per_class=3, max_images=5000)) == 120
    with pytest.raises(ExportError, match="in all"):
        pick(samples, names, max_images=0)
