"""Helpers shared by the tests (importable: tests/ is on sys.path via the root conftest)."""
from __future__ import annotations

TINY = "tiny-test"


def tiny_method_config(method_name: str) -> dict:
    """Method config overrides that fit the 2-layer tiny backbone (the method's ``config_for_backbone`` hook)."""
    from training.backbone import get_backbone_spec
    from training.methods import get_method_class

    return get_method_class(method_name).config_for_backbone(get_backbone_spec(TINY).num_layers)


#: The classes of the session's small shapes set (some share a colour or a shape, so both matter).
SHAPE_CLASSES = (("red", "circle"), ("red", "square"), ("blue", "circle"), ("blue", "triangle"), ("green", "star"),
                 ("yellow", "diamond"), ("purple", "hexagon"), ("orange", "cross"))


def make_shapes(root, *, train_per_class: int = 4, test_per_class: int = 2, size: int = 32, seed: int = 0):
    """A small ImageFolder (``root/{train,test}/<color>_<shape>/``) of toy-world ``clean`` images of
    :data:`SHAPE_CLASSES`; returns its :class:`~training.data.DatasetSplits`."""
    from training.toyworld import world

    return world.write_style_dataset(root, "clean", classes=SHAPE_CLASSES, train_per_class=train_per_class,
                                     test_per_class=test_per_class, size=size, seed=seed)


def make_fake_oxford_pets(root, classes=("abyssinian", "beagle", "boxer", "chihuahua", "pug", "sphynx"),
                          n_train: int = 4, n_test: int = 2, size: int = 32):
    """A CoOp-layout OxfordPets tree: ``root/oxford_pets/images/*.jpg`` + ``split_zhou_OxfordPets.json``."""
    import json
    from pathlib import Path

    import numpy as np
    from PIL import Image

    base = Path(root) / "oxford_pets"
    (base / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    split = {"train": [], "val": [], "test": []}
    for label, name in enumerate(classes):
        colour = rng.integers(0, 255, 3)
        for part, n in (("train", n_train), ("val", 1), ("test", n_test)):
            for i in range(n):
                fname = f"{name}_{part}_{i}.jpg"
                arr = np.clip(colour + rng.normal(0, 20, (size, size, 3)), 0, 255).astype("uint8")
                Image.fromarray(arr).save(base / "images" / fname)
                split[part].append([fname, label, name])
    (base / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    return Path(root)


def assert_torch_free(statements: str) -> None:
    """Run ``statements`` in a fresh interpreter and assert torch/torchvision/open_clip were never imported."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = (statements + "\nimport sys\nbad = [m for m in ('torch', 'torchvision', 'open_clip') if m in sys.modules]"
            "\nassert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr


def toy_zeroshot_bundle(root, classes, *, test_per_class: int, style: str = "clean"):
    """toy-clip zero-shot on toy-world ``classes`` (1 training step), exported with ``calibration="auto"``: their
    held-out test images under ``root/known``. Returns ``(bundle path, the dataset's splits)``."""
    from export.bundle import export_bundle
    from training.engine import TrainConfig
    from training.methods import method_config_for_backbone
    from training.toyworld import world
    from training.workflow import train_run

    splits = world.write_style_dataset(root / "known", style, classes=classes, train_per_class=1,
                                       test_per_class=test_per_class, seed=0)
    cfg = TrainConfig(epochs=1, max_steps=1, batch_size=4, precision="fp32", device="cpu", seed=0)
    run = train_run(method_name="zeroshot", data_root=root / "known", out_dir=root / "run", backbone_name="toy-clip",
                    method_config=method_config_for_backbone("zeroshot", "toy-clip"), train_config=cfg, shots=1,
                    subsample="all", evaluate_splits=False, progress=False)
    bundle = export_bundle(run.artifact, root / "bundle", exporter="torchscript", calibration="auto", progress=False)
    return bundle, splits
