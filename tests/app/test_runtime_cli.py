"""`classify --runtime/--providers` and `engine build` on the command line (this host has no GPU and no TensorRT)."""
from __future__ import annotations

import pytest

from promptclip.cli import main
from promptclip_testing import assert_torch_free


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_engine_build_help(capsys):
    with pytest.raises(SystemExit):
        main(["engine", "build", "--help"])
    out = capsys.readouterr().out
    assert "--max-batch" in out and "not portable" in out


def test_classify_runtime_and_providers(bundles, shapes_root, capsys):
    image = next((shapes_root / "test").rglob("*.png"))
    bundle = str(bundles["coop"])
    assert main(["classify", "--bundle", bundle, str(image), "--top-k", "2", "--runtime", "ort",
                 "--providers", "cpu"]) == 0
    assert '"predictions"' in capsys.readouterr().out
    assert main(["classify", "--bundle", bundle, str(image), "--runtime", "ort", "--providers", "cuda"]) == 2
    assert "CUDAExecutionProvider" in _err(capsys)
    assert main(["classify", "--bundle", bundle, str(image), "--runtime", "tensorrt"]) == 2
    assert "pip install 'promptclip[trt]'" in _err(capsys)


def test_engine_build_without_tensorrt_is_one_clear_error(bundles, capsys):
    assert main(["engine", "build", "--bundle", str(bundles["coop"])]) == 2
    assert "TensorRT is not installed here" in _err(capsys)


def test_engine_build_is_torch_free(bundles):
    assert_torch_free("from promptclip.cli import main\n"
                      f"assert main(['engine', 'build', '--bundle', {str(bundles['coop'])!r}]) == 2\n")
