"""Shared session fixtures: a tiny random-init CLIP, a tiny labelled image set, trained artifacts, bundles.

Nothing here downloads: HF_HUB_OFFLINE and BENTOML_DO_NOT_TRACK are set before anything imports open_clip/bentoml.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402

from promptclip_testing import TINY, tiny_method_config  # noqa: E402


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    """A small ImageFolder (train/test) of coloured shapes at 32 px, 8 classes."""
    from promptclip_testing import make_shapes

    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, train_per_class=4, test_per_class=2, size=32, seed=0)
    return root


@pytest.fixture(scope="session")
def trained(tmp_path_factory, shapes_root):
    """method name -> TrainRunResult, every registered single-source method trained a few steps on the base classes
    (methods that need several source domains, GuiDG, have their own fixtures on domain-tagged data)."""
    from training.engine import TrainConfig
    from training.methods import get_method_class, list_methods
    from training.workflow import train_run

    out = {}
    cfg = TrainConfig(epochs=1, max_steps=3, batch_size=8, lr=0.01, precision="fp32", device="cpu", seed=1)
    for name in list_methods():
        if get_method_class(name).needs_domains:
            continue
        run_dir = tmp_path_factory.mktemp(f"run-{name}")
        out[name] = train_run(method_name=name, data_root=shapes_root, out_dir=run_dir, backbone_name=TINY,
                              method_config=tiny_method_config(name), train_config=cfg, shots=4, subsample="base",
                              progress=False)
    return out


@pytest.fixture(scope="session")
def bundles(tmp_path_factory, trained):
    """method name -> exported bundle path (torchscript exporter for speed; dynamo is covered in test_export)."""
    from export.bundle import export_bundle

    out = {}
    for name, run in trained.items():
        out[name] = export_bundle(run.artifact, tmp_path_factory.mktemp(f"bundle-{name}") / "bundle",
                                  exporter="torchscript")
    return out


@pytest.fixture(scope="session")
def two_domain_shapes(shapes_root):
    """The shapes set with its training images split between two domains, "a" and "b" (for GuiDG)."""
    import dataclasses

    from training.data import read_image_folder

    splits = read_image_folder(shapes_root)
    train_samples = [dataclasses.replace(s, domain="ab"[i % 2]) for i, s in enumerate(splits.train)]
    return dataclasses.replace(splits, train=train_samples)


@pytest.fixture(scope="session")
def guidg_trained(tmp_path_factory, two_domain_shapes):
    """(TrainRunResult, train_run kwargs) of GuiDG on the two-domain shapes: two experts + fine-tuning, a few steps."""
    from training.engine import TrainConfig
    from training.workflow import train_run

    cfg = TrainConfig(epochs=1, max_steps=3, batch_size=8, lr=0.01, precision="fp32", device="cpu", seed=1)
    kwargs = dict(method_name="guidg", data_root=two_domain_shapes, out_dir=tmp_path_factory.mktemp("run-guidg"),
                  backbone_name=TINY, method_config={"n_ctx": 4, "finetune_lr": 1e-3}, train_config=cfg, shots=2,
                  subsample="all", progress=False)
    return train_run(**kwargs), kwargs


@pytest.fixture(scope="session")
def guidg_bundle(tmp_path_factory, guidg_trained):
    """The GuiDG run exported (bundle format 2: two experts)."""
    from export.bundle import export_bundle

    return export_bundle(guidg_trained[0].artifact, tmp_path_factory.mktemp("bundle-guidg") / "bundle",
                         exporter="torchscript")
