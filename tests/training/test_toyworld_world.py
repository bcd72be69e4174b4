"""Tests of training.toyworld.world: the procedural toy world (classes, rendering styles, captions,
pretraining batches, downstream datasets) and the contact sheet."""
from __future__ import annotations

import itertools
import json
import logging
import os
import time

import numpy as np
import pytest
from PIL import Image

from training.errors import DatasetError
from training.toyworld import world
from training.toyworld.preview import save_contact_sheet


def _centre_scene(style_texture: str = "plain", **kw) -> world.Scene:
    args = dict(color="red", shape="circle", size="small", texture=style_texture, x=0.5, y=0.5, rotation=0.0)
    args.update(kw)
    return world.Scene(**args)


def _border(arr: np.ndarray) -> np.ndarray:
    """Pixels of the outer 3-pixel frame, [N, 3] float."""
    a = arr.astype(np.float32)
    return np.concatenate([a[:3].reshape(-1, 3), a[-3:].reshape(-1, 3), a[3:-3, :3].reshape(-1, 3),
                           a[3:-3, -3:].reshape(-1, 3)])


def test_vocabulary_and_classes():
    assert list(world.COLORS) == ["red", "orange", "yellow", "green", "teal", "blue", "purple", "pink", "brown",
                                  "black"]
    assert len(world.SHAPES) == 12 and len(set(world.SHAPES)) == 12
    assert set(world.STYLES) == {"clean", "sketch", "noisy", "lowres", "palette"}
    classes = world.all_classes()
    assert len(classes) == 120 and len(set(classes)) == 120
    names = [world.class_name(c, s) for c, s in classes]
    assert names == sorted(names) and world.class_name("red", "circle") == "red circle"
    # colours well separated, also after the palette remap
    for table in ({k: np.asarray(v, float) for k, v in world.COLORS.items()},
                  {k: world.palette_color(v) for k, v in world.COLORS.items()}):
        dists = [np.linalg.norm(table[a] - table[b]) for a, b in itertools.combinations(table, 2)]
        assert min(dists) > 55


def test_pretrain_batch_deterministic():
    a = world.pretrain_batch(7, 16)
    b = world.pretrain_batch(7, 16)
    c = world.pretrain_batch(8, 16)
    assert a[0].shape == (16, 32, 32, 3) and a[0].dtype == np.uint8
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1] and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])
    small = world.pretrain_batch(7, 4, size=16)
    assert small[0].shape == (4, 16, 16, 3)


def test_render_deterministic():
    scene = world.sample_scene(np.random.default_rng(3), "blue", "star", style="pretrain")
    assert scene == world.sample_scene(np.random.default_rng(3), "blue", "star", style="pretrain")
    for style in ("pretrain", *world.STYLES):
        one = np.asarray(world.render(scene, style=style, rng=np.random.default_rng(1)))
        two = np.asarray(world.render(scene, style=style, rng=np.random.default_rng(1)))
        other = np.asarray(world.render(scene, style=style, rng=np.random.default_rng(2)))
        np.testing.assert_array_equal(one, two)
        assert not np.array_equal(one, other)


def test_holdout_never_in_pretraining_but_every_word_is():
    holdout = world.default_holdout()
    assert len(holdout) == 16 and len(set(holdout)) == 16
    assert holdout == world.default_holdout(0) and holdout != world.default_holdout(1)
    assert {c for c, _ in holdout} == set(world.COLORS)  # every colour has an unseen combo ...
    assert {s for _, s in holdout} == set(world.SHAPES)  # ... and so does every shape
    held = set(holdout)
    seen_main, seen_second = set(), set()
    captions = []
    for step in range(50):
        _, caps, labels = world.pretrain_batch(step, 32, holdout=holdout)
        seen_main.update(labels)
        captions.extend(caps)
    assert not seen_main & held
    mentioned = set()
    for cap in captions:  # second objects appear in captions as "next to a <color> <shape>"
        if " next to a " in cap:
            words = cap.split(" next to a ")[1].rstrip(".").split()
            seen_second.add((words[0], words[1]))
        for c, s in world.all_classes():
            if f"{c} {s}" in cap:
                mentioned.add((c, s))
    assert seen_second and not seen_second & held
    assert not mentioned & held
    assert {c for c, _ in seen_main} == set(world.COLORS)
    assert {s for _, s in seen_main} == set(world.SHAPES)


def test_holdout_excludes_second_objects():
    rng = np.random.default_rng(0)
    pool = world._pretrain_pool(frozenset(world.default_holdout()))
    index = world._pool_index(pool)
    held = set(world.default_holdout())
    seconds = set()
    for _ in range(400):
        u = rng.random(world._N_SCENE_U)
        scene = world._scene_from_u(u, "red", "circle", "pretrain", pool, index)
        if scene.second:
            assert scene.second != ("red", "circle")
            seconds.add(scene.second)
    assert seconds and not seconds & held


def test_captions():
    rng = np.random.default_rng(0)
    with_second = 0
    for color, shape in world.all_classes()[::7]:
        for _ in range(5):
            scene = world.sample_scene(rng, color, shape, style="pretrain")
            cap = world.caption(scene, rng)
            assert cap.strip() and color in cap and shape in cap
            if scene.second and "next to a" in cap:
                with_second += 1
                assert f"next to a {scene.second[0]} {scene.second[1]}" in cap
    assert with_second > 0
    for template in world.CAPTION_TEMPLATES:
        assert "{color}" in template and "{shape}" in template


def test_sample_scene_downstream_rules():
    rng = np.random.default_rng(1)
    scenes = [world.sample_scene(rng, "teal", "heart", style="clean") for _ in range(200)]
    assert all(s.second is None for s in scenes)
    assert {s.texture for s in scenes} == {"plain", "striped"}
    assert {s.size for s in scenes} == set(world.SIZES)
    pre = [world.sample_scene(rng, "teal", "heart", style="pretrain") for _ in range(300)]
    assert {s.texture for s in pre} == set(world.TEXTURES)
    assert 0.2 < np.mean([s.second is not None for s in pre]) < 0.4
    assert all(0 < s.x < 1 and 0 < s.y < 1 and 0 <= s.rotation < 360 for s in pre)
    with pytest.raises(DatasetError, match="sketch"):
        world.sample_scene(rng, "teal", "heart", style="cartoon")
    with pytest.raises(DatasetError, match="colour"):
        world.sample_scene(rng, "white", "heart", style="clean")


@pytest.mark.parametrize("style", ["pretrain", *world.STYLES])
def test_render_size_and_mode(style):
    scene = world.sample_scene(np.random.default_rng(0), "green", "arrow", style=style)
    for size in (32, 24):
        im = world.render(scene, style=style, size=size, rng=np.random.default_rng(0))
        assert im.mode == "RGB" and im.size == (size, size)


def test_styles_differ_measurably():
    scene = _centre_scene()
    arrays = {s: np.asarray(world.render(scene, style=s, rng=np.random.default_rng(5))).astype(np.float32)
              for s in ("clean", *world.STYLES)}
    # sketch: light background; palette: dark background; clean: mid grey
    assert _border(arrays["sketch"]).mean() > 225
    assert _border(arrays["palette"]).mean() < 60
    assert 60 < _border(arrays["clean"]).mean() < 215
    # lowres: constant 4x4 blocks at 32 px
    lo = arrays["lowres"]
    blocks = lo.reshape(8, 4, 8, 4, 3)
    assert np.all(blocks == blocks[:, :1, :, :1, :])
    assert not np.all(arrays["clean"].reshape(8, 4, 8, 4, 3) == arrays["clean"].reshape(8, 4, 8, 4, 3)[:, :1, :, :1])
    # noisy: high local variance (neighbour differences) vs. clean's mild noise on a plain background
    def local(a):
        b = a[:6]  # top band, background only (object small and centred)
        return float(np.abs(np.diff(b, axis=1)).mean())
    assert local(arrays["noisy"]) > 25 > 8 > local(arrays["clean"])
    # sketch keeps only an outline: the centre of a large filled square stays background
    big = _centre_scene(shape="square", size="large")
    sk = np.asarray(world.render(big, style="sketch", rng=np.random.default_rng(0))).astype(np.float32)
    cl = np.asarray(world.render(big, style="clean", rng=np.random.default_rng(0))).astype(np.float32)
    assert sk[14:18, 14:18].mean() > 225
    assert np.abs(cl[14:18, 14:18] - np.asarray(world.COLORS["red"], np.float32)).mean() < 25
    # the object is visible in every style (centre differs from the background)
    for style, arr in arrays.items():
        if style != "sketch":
            assert np.abs(arr[14:18, 14:18].mean((0, 1)) - _border(arr).mean(0)).max() > 40, style


def test_palette_black_visible():
    scene = _centre_scene(color="black", size="large", shape="square")
    arr = np.asarray(world.render(scene, style="palette", rng=np.random.default_rng(0))).astype(np.float32)
    assert arr.max() > 120  # the light rim
    centre = arr[14:18, 14:18].mean((0, 1))
    assert np.allclose(centre, world.palette_color(world.COLORS["black"]), atol=20)


def test_style_classes():
    a = world.style_classes("clean")
    assert len(a) == 40 and len(set(a)) == 40
    assert a == world.style_classes("clean", seed=0)
    assert a == sorted(a, key=lambda p: world.class_name(*p))
    assert a != world.style_classes("clean", seed=1)
    b = world.style_classes("sketch")
    assert a != b and set(a) & set(b)
    assert len(world.style_classes("noisy", num_classes=10)) == 10
    with pytest.raises(DatasetError, match="palette"):
        world.style_classes("pretrainish")
    with pytest.raises(DatasetError):
        world.style_classes("clean", num_classes=121)


def test_write_style_dataset(tmp_path, caplog):
    root = tmp_path / "sketch"
    classes = [("red", "circle"), ("blue", "heart"), ("black", "bar")]
    splits = world.write_style_dataset(root, "sketch", classes=classes, train_per_class=3, test_per_class=2, size=16)
    assert splits.classnames == ["black bar", "blue heart", "red circle"]
    assert len(splits.train) == 9 and len(splits.test) == 6
    assert (root / "train" / "red_circle" / "2.png").is_file() and (root / "test" / "black_bar" / "1.png").is_file()
    with Image.open(root / "train" / "blue_heart" / "0.png") as im:
        assert im.size == (16, 16) and im.mode == "RGB"
    stamp_files = [p for p in os.listdir(root) if p.startswith(".")]
    assert len(stamp_files) == 1
    stamp = json.loads((root / stamp_files[0]).read_text())
    assert stamp["style"] == "sketch" and stamp["size"] == 16

    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.png")}
    caplog.set_level("INFO", logger="training.toyworld.world")
    again = world.write_style_dataset(root, "sketch", classes=classes, train_per_class=3, test_per_class=2, size=16)
    assert "reusing" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.png")} == before
    assert again.classnames == splits.classnames

    # same arguments elsewhere give byte-identical files
    other = tmp_path / "copy"
    world.write_style_dataset(other, "sketch", classes=classes, train_per_class=3, test_per_class=2, size=16)
    rel = os.path.join("test", "red_circle", "0.png")
    assert (other / rel).read_bytes() == (root / rel).read_bytes()

    # other arguments rewrite the set
    world.write_style_dataset(root, "sketch", classes=classes[:2], train_per_class=1, test_per_class=0, size=16)
    assert not (root / "train" / "black_bar").exists() and not (root / "test").exists()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty"):
        world.write_style_dataset(foreign, "clean", classes=classes)
    with pytest.raises(DatasetError, match="clean, sketch, noisy, lowres, palette"):
        world.write_style_dataset(tmp_path / "x", "oil-painting", classes=classes)


def test_write_style_dataset_default_classes(tmp_path):
    splits = world.write_style_dataset(tmp_path / "lowres", "lowres", train_per_class=1, test_per_class=0,
                                       seed=3)
    expected = world.style_classes("lowres", seed=3)
    assert splits.classnames == [world.class_name(c, s) for c, s in expected]


def test_contact_sheet(tmp_path):
    path = save_contact_sheet(tmp_path / "sheet.png", styles=("pretrain", "palette"),
                              classes=[("red", "circle"), ("black", "ring")], size=16, scale=2)
    with Image.open(path) as im:
        assert im.mode == "RGB" and im.width > 2 * 32 and im.height > 2 * 32


def test_pretrain_batch_timing_reported(caplog):
    """Not a performance assertion: logs the warm time of a 256-image batch (see the report)."""
    world.pretrain_batch(0, 256)
    t0 = time.perf_counter()
    world.pretrain_batch(1, 256)
    ms = 1000 * (time.perf_counter() - t0)
    caplog.set_level("INFO")
    logging.getLogger(__name__).info("pretrain_batch(256, 32 px): %.1f ms", ms)
    assert ms > 0
