"""The `promptclip` command: listings, help, and one clear error line (exit 2, no traceback) for user mistakes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from promptclip.cli import main
from promptclip_testing import assert_torch_free

SUBCOMMANDS = ["train", "eval", "export", "serve", "classify", "demo", "methods", "backbones", "reproduce",
               "toyworld", "bench"]


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help_explains_each_subcommand(sub, capsys):
    with pytest.raises(SystemExit) as exc:
        main([sub, "--help"])
    assert exc.value.code == 0
    assert "usage: promptclip " + sub in capsys.readouterr().out


def test_listings(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "ivlp" in out and "coop" in out and "zeroshot" in out
    assert main(["backbones"]) == 0
    assert "ViT-B-16" in capsys.readouterr().out


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_unknown_method_and_backbone(capsys, shapes_root, tmp_path):
    assert main(["train", "--method", "coopp", "--data", str(shapes_root), "--out", str(tmp_path / "r"),
                 "--backbone", "tiny-test"]) == 2
    assert "known methods: zeroshot, coop, ivlp" in _err(capsys)
    assert main(["train", "--method", "coop", "--data", str(shapes_root), "--out", str(tmp_path / "r"),
                 "--backbone", "vit-b-16"]) == 2
    assert "known backbones" in _err(capsys)


def test_missing_dataset_and_bad_set(capsys, tmp_path):
    assert main(["train", "--method", "coop", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r"),
                 "--backbone", "tiny-test"]) == 2
    assert "nope" in _err(capsys)
    assert main(["train", "--method", "coop", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                 "--backbone", "tiny-test", "--set", "n_ctx"]) == 2
    assert "key=value" in _err(capsys)


def test_export_and_serve_bad_paths(capsys, tmp_path):
    assert main(["export", "--artifact", str(tmp_path / "none"), "--out", str(tmp_path / "b")]) == 2
    assert "does not exist" in _err(capsys)
    assert main(["serve", "--bundle", str(tmp_path / "none")]) == 2
    assert "bundle" in _err(capsys).lower()


def test_train_eval_export_classify_via_cli(capsys, shapes_root, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--method", "coop", "--data", str(shapes_root), "--out", str(run), "--backbone", "tiny-test",
                 "--set", "n_ctx=4", "--max-steps", "2", "--batch-size", "8", "--shots", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "harmonic_mean" in out
    assert main(["eval", "--artifact", str(run / "artifact"), "--data", str(shapes_root), "--subsample", "new",
                 "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["num_classes"] == 4 and 0 <= res["accuracy"] <= 1
    assert main(["export", "--artifact", str(run / "artifact"), "--out", str(tmp_path / "bundle"),
                 "--exporter", "torchscript", "--classes", "red circle,blue square,zebra"]) == 0
    capsys.readouterr()
    image = next((shapes_root / "test").glob("*/*.png"))
    assert main(["classify", "--bundle", str(tmp_path / "bundle"), str(image), "--top-k", "2"]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert len(line["predictions"]) == 2
    # export's default calibration is the held-out split of the recorded data root (2 red-circle images here)
    assert line["open_set"]["rule"] == "max_cosine" and isinstance(line["none_of_these"], bool)
    assert main(["classify", "--bundle", str(tmp_path / "bundle"), str(image), "--top-k", "9"]) == 2
    assert "top_k" in _err(capsys)


def test_multi_source_dg_train_export_classify_via_cli(capsys, tmp_path):
    """GuiDG from a ROOT/<domain>/<class>/ folder: one expert per source domain, a format-2 bundle, classify."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for d, domain in enumerate(("photo", "sketch", "paint")):
        for label, cls in enumerate(("red circle", "blue square", "green star")):
            for i in range(6):
                path = tmp_path / "data" / domain / cls.replace(" ", "_") / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                colour = np.array([60 * label + 40, 50 * d + 30, 90], dtype=float)
                arr = np.clip(colour + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype("uint8")
                Image.fromarray(arr).save(path)
    run = tmp_path / "run"
    assert main(["train", "--method", "guidg", "--data", str(tmp_path / "data"), "--target-domain", "paint",
                 "--out", str(run), "--backbone", "tiny-test", "--set", "n_ctx=4", "--max-steps", "2",
                 "--batch-size", "4", "--shots", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads(out[out.index("{"):])
    assert [s["stage"] for s in metrics["stages"]] == ["expert-0", "expert-1", "finetune"]
    assert metrics["all_num_images"] == 3  # 20% of the 18 target-domain images
    assert main(["eval", "--artifact", str(run / "artifact"), "--data", str(tmp_path / "data"),
                 "--target-domain", "paint", "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["num_images"] == 3 and res["accuracy"] == pytest.approx(metrics["all_accuracy"])
    assert main(["export", "--artifact", str(run / "artifact"), "--out", str(tmp_path / "bundle"),
                 "--exporter", "torchscript"]) == 0
    capsys.readouterr()
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["prompt_sets"]["names"] == ["photo", "sketch"]
    image = next((tmp_path / "data" / "paint").glob("*/*.png"))
    assert main(["classify", "--bundle", str(tmp_path / "bundle"), str(image), "--top-k", "3"]) == 0
    assert len(json.loads(capsys.readouterr().out.splitlines()[0])["predictions"]) == 3
    assert main(["train", "--method", "guidg", "--data", str(tmp_path / "data"), "--target-domain", "mars",
                 "--out", str(tmp_path / "run2"), "--backbone", "tiny-test"]) == 2
    assert "not one of the domains" in _err(capsys)


def test_console_script_is_installed():
    """`promptclip` on PATH (the README's commands run as a new user would)."""
    import shutil

    exe = shutil.which("promptclip") or str(__import__("pathlib").Path(sys.executable).parent / "promptclip")
    r = subprocess.run([exe, "methods"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ivlp" in r.stdout


def test_python_dash_m_promptclip():
    """`python -m promptclip` is the same command line as the script."""
    r = subprocess.run([sys.executable, "-m", "promptclip", "methods"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ivlp" in r.stdout


def test_building_the_parser_loads_no_command_group():
    """Parsers are standard library only: `--help` of any command imports no handler module and no torch."""
    assert_torch_free("import sys\nfrom promptclip.cli import build_parser\nbuild_parser()\n"
                      "loaded = [m for m in sys.modules if m.startswith(('promptclip.cli.commands.', 'training', "
                      "'export', 'promptclip.demo', 'promptclip.server'))]\nassert not loaded, loaded")


def test_serve_and_classify_are_torch_free(bundles, shapes_root):
    """A serving host has no torch: `classify` and `serve` (up to starting bentoml) run through the CLI without it, and
    `classes` (add/list/remove on a state dir) imports none."""
    image = next((shapes_root / "test").glob("*/*.png"))
    bundle = str(bundles["coop"])
    assert_torch_free(f"from promptclip.cli import main\n"
                      f"assert main(['classify', '--bundle', {bundle!r}, {str(image)!r}, '--top-k', '2']) == 0\n"
                      f"assert main(['serve', '--bundle', {bundle + '-missing'!r}]) == 2\n"
                      f"import promptclip.cli.commands.serve, promptclip.cli.commands.classes, promptclip.server")


def test_eval_accepts_a_test_only_folder(capsys, trained, shapes_root, tmp_path):
    import shutil

    shutil.copytree(shapes_root / "test", tmp_path / "only" / "test")
    results = []
    for data in (tmp_path / "only", shapes_root):
        assert main(["eval", "--artifact", str(trained["coop"].artifact), "--data", str(data), "--device", "cpu"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["num_images"] == results[1]["num_images"] > 0
    assert results[0]["accuracy"] == results[1]["accuracy"]
