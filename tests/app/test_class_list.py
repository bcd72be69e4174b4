"""`--classes`: comma-separated or a JSON list (issue 16 item 9)."""
from __future__ import annotations

import argparse

import pytest

from promptclip.cli.values import class_list
from serving.errors import PromptclipError


def test_classes_comma_separated_or_json():
    assert class_list(argparse.Namespace(classes="red circle,blue square")) == ["red circle", "blue square"]
    assert class_list(argparse.Namespace(classes='["Washington, D.C.", "Paris"]')) == ["Washington, D.C.", "Paris"]
    with pytest.raises(PromptclipError, match="not valid JSON"):
        class_list(argparse.Namespace(classes='["a", '))
    with pytest.raises(PromptclipError, match="list of strings"):
        class_list(argparse.Namespace(classes="[1, 2]"))
