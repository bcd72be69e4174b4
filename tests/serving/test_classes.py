"""serving.classes.ClassRegistry: validation, add/remove, persistence, reload and cross-instance safety."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from serving.classes import STATE_FILE, ClassRegistry, ClassStateError
from serving.errors import BundleError, ClassNameError, RequestError, UnknownClassError
from serving.http_errors import http_status
from serving.tokenizer import ClipTokenizer, default_vocab_path

TEMPLATE = "a photo of a {}."
INITIAL = ["cat", "dog", "red car"]
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer(default_vocab_path())


@pytest.fixture
def make(tokenizer):
    def make(state_dir=None, initial=INITIAL, **kw) -> ClassRegistry:
        return ClassRegistry(state_dir, initial, tokenizer=tokenizer, template=TEMPLATE, **kw)

    return make


# -- validation ------------------------------------------------------------------------------------


def test_normalize_strips_and_collapses_whitespace(make):
    reg = make()
    assert reg.normalize_name("  red \t  car\n") == "red car"
    assert reg.normalize_name("café crème") == "café crème"


def test_normalize_applies_the_one_class_name_rule(make):
    """Runtime names follow serving.format.canonical_class_name, like exported and dataset names."""
    reg = make()
    assert reg.normalize_name("golden_retriever") == "golden retriever"
    assert reg.normalize_name(" Golden  Retriever") == "Golden Retriever"  # case is kept as written
    with pytest.raises(ClassNameError, match="empty"):
        reg.normalize_name(" _ __ ")
    assert reg.add(["golden_retriever"]) == ["golden retriever"]
    with pytest.raises(ClassNameError, match="already registered"):
        reg.add(["golden  retriever"])
    with pytest.raises(ClassNameError, match="more than once"):
        reg.add(["sea_lion", "sea lion"])
    assert reg.remove(["red_car"]) == ["red car"]
    assert reg.names() == ["cat", "dog", "golden retriever"]


def test_case_twins_are_one_class(make):
    """Issue 16 item 9 (changed from "case twins are kept but logged"): "Red Circle" and "red circle" would get one
    embedding (CLIP lowercases) and split its score, so the second spelling is refused as already registered."""
    reg = make()
    with pytest.raises(ClassNameError, match=r"already registered: 'Cat' \(as 'cat'\).*ignoring case"):
        reg.add(["Cat"])
    reg.add(["Red Circle"])
    with pytest.raises(ClassNameError, match="already registered"):
        reg.add(["red  circle"])
    with pytest.raises(ClassNameError, match="more than once"):
        reg.add(["Blue Square", "blue square"])
    assert reg.names() == [*INITIAL, "Red Circle"]
    assert reg.remove(["RED CIRCLE"]) == ["Red Circle"], "removal finds the registered spelling"
    assert reg.names() == INITIAL


def test_unicode_policy(make):
    """NFC, ZWJ (emoji sequences) and ZWNJ (Persian) are kept; other invisible format characters are refused."""
    reg = make()
    assert reg.normalize_name("cafe\u0301") == "caf\u00e9"  # decomposed e + accent -> composed
    for name in ("\U0001F469\u200D\U0001F52C", "\u0645\u06CC\u200C\u062E\u0648\u0627\u0647\u0645"):
        assert reg.normalize_name(name) == name
    reg.add(["\U0001F469\u200D\U0001F52C"])
    with pytest.raises(ClassNameError, match="U\\+200B"):
        reg.normalize_name("zero\u200bwidth")


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("", "empty"),
        ("   \t ", "empty"),
        ("bad\x00name", "U\\+0000"),
        ("zero\u200bwidth", "U\\+200B"),
        ("rtl\u202eoverride", "U\\+202E"),
        ("x" * 201, "201 characters long; the limit is 200"),
        ("a <start_of_text> b", "reserved token"),
        (42, "must be strings"),
    ],
)
def test_normalize_rejects(make, name, pattern):
    with pytest.raises(ClassNameError, match=pattern) as info:
        make().normalize_name(name, field="classes")
    assert info.value.field == "classes"
    assert http_status(info.value) == 422


def test_too_many_tokens_is_refused_with_count_and_limit(make):
    name = " ".join(["x"] * 80)  # 160 characters but 80 tokens + template + SOT/EOT
    with pytest.raises(ClassNameError) as info:
        make().normalize_name(name)
    msg = str(info.value)
    assert "tokens long" in msg and "at most 77" in msg and "never truncated" in msg


def test_bundle_names_are_validated(make):
    with pytest.raises(BundleError, match="re-export"):
        make(initial=["cat", "cat"])
    with pytest.raises(BundleError, match="not normalised"):
        make(initial=["cat", " dog"])


# -- add / remove ----------------------------------------------------------------------------------


def test_add_and_remove_in_memory(make):
    reg = make()
    assert reg.version == 1 and reg.names() == INITIAL
    assert reg.add(["  zebra ", "blue  whale"]) == ["zebra", "blue whale"]
    assert reg.names() == [*INITIAL, "zebra", "blue whale"]
    assert reg.version == 2
    assert reg.remove(["dog"]) == ["dog"]
    assert reg.names() == ["cat", "red car", "zebra", "blue whale"]
    assert reg.version == 3
    assert reg.refresh() is False  # nothing on disk to reload


def test_add_refuses_duplicates_and_registered_names(make):
    reg = make()
    with pytest.raises(ClassNameError, match="more than once"):
        reg.add(["zebra", " zebra"])
    with pytest.raises(ClassNameError, match="already registered"):
        reg.add(["cat"])
    with pytest.raises(ClassNameError, match="list of class names"):
        reg.add("zebra")
    with pytest.raises(ClassNameError, match="empty"):
        reg.add([])
    assert reg.version == 1  # nothing was applied
    with pytest.raises(ClassNameError, match="already registered"):  # issue 16: case is not part of the identity
        reg.add(["Cat"])
    assert "Cat" not in reg


def test_add_respects_max_classes(make):
    reg = make(max_classes=4)
    reg.add(["zebra"])
    with pytest.raises(RequestError, match="limit is 4"):
        reg.add(["lion"])


def test_remove_unknown_and_remove_all(make):
    reg = make()
    with pytest.raises(UnknownClassError) as info:
        reg.remove(["dgo"])
    msg = str(info.value)
    assert "'dgo'" in msg and "did you mean 'dog'" in msg and "'cat'" in msg
    assert http_status(info.value) == 404
    with pytest.raises(ClassNameError, match="at least one class must remain"):
        reg.remove(INITIAL)
    assert reg.names() == INITIAL


# -- persistence -----------------------------------------------------------------------------------


def test_state_file_is_created_and_survives_restart(make, tmp_path):
    reg = make(tmp_path)
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert state == {"format": "promptclip.classes", "format_version": 1, "version": 1, "names": INITIAL}
    reg.add(["zebra"])
    reg.remove(["dog"])
    restarted = make(tmp_path, initial=["something", "else"])  # the state file wins over the bundle list
    assert restarted.names() == ["cat", "red car", "zebra"]
    assert restarted.version == 3
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind


@pytest.mark.parametrize(
    "content",
    [
        "{truncated",
        json.dumps({"format": "other", "format_version": 1, "version": 1, "names": ["a"]}),
        json.dumps({"format": "promptclip.classes", "format_version": 1, "version": 1, "names": []}),
        json.dumps({"format": "promptclip.classes", "format_version": 1, "version": "x", "names": ["a"]}),
        json.dumps({"format": "promptclip.classes", "format_version": 1, "version": 1, "names": ["a\x00"]}),
    ],
)
def test_corrupt_state_file_is_refused_and_kept(make, tmp_path, content):
    path = tmp_path / STATE_FILE
    path.write_text(content)
    with pytest.raises(ClassStateError) as info:
        make(tmp_path)
    msg = str(info.value)
    assert str(path) in msg and "Move it away" in msg
    assert http_status(info.value) == 503  # issue 16: not ready while the class state is unreadable
    assert path.read_text() == content  # never overwritten


def test_state_from_before_the_class_name_rule_keeps_its_classes(make, tmp_path, caplog):
    """A runtime class stored as ``golden_retriever`` (before underscores became spaces) is kept, renamed by the
    rule with a warning; two spellings of one class are kept once; the file is only rewritten by the next change."""
    path = tmp_path / STATE_FILE
    old = {"format": "promptclip.classes", "format_version": 1, "version": 4,
           "names": ["cat", "golden_retriever", "golden retriever", "red  car"]}
    path.write_text(json.dumps(old))
    with caplog.at_level("WARNING", logger="serving.classes"):
        reg = make(tmp_path)
    assert reg.names() == ["cat", "golden retriever", "red car"] and reg.version == 4
    assert "rewritten by the class-name rule" in caplog.text and "kept once" in caplog.text
    assert json.loads(path.read_text()) == old
    reg.add(["zebra"])
    assert json.loads(path.read_text())["names"] == ["cat", "golden retriever", "red car", "zebra"]


def test_corrupt_file_during_mutation_is_not_overwritten(make, tmp_path):
    reg = make(tmp_path)
    (tmp_path / STATE_FILE).write_text("garbage")
    with pytest.raises(ClassStateError):
        reg.add(["zebra"])
    assert (tmp_path / STATE_FILE).read_text() == "garbage"


def test_refresh_sees_changes_of_another_instance(make, tmp_path):
    a = make(tmp_path)
    b = make(tmp_path)
    a.add(["zebra"])
    assert b.version == 1
    assert b.refresh() is True
    assert b.names() == [*INITIAL, "zebra"] and b.version == 2
    assert b.refresh() is False
    # b mutates without refreshing first: the change is applied on top of a's newer state.
    a.add(["lion"])
    b.add(["tiger"])
    assert b.names() == [*INITIAL, "zebra", "lion", "tiger"]
    assert a.refresh() is True and a.names() == b.names() and a.version == b.version == 4
    with pytest.raises(ClassNameError, match="already registered"):
        a.add(["tiger"])


def test_concurrent_adds_from_two_instances_lose_nothing(make, tmp_path):
    regs = [make(tmp_path), make(tmp_path)]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(10):
                regs[k].add([f"class {k}-{i}"])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    final = make(tmp_path)
    assert final.version == 21
    assert sorted(final.names()[3:]) == sorted(f"class {k}-{i}" for k in range(2) for i in range(10))


def test_acknowledged_add_survives_kill_9(tmp_path):
    """A process that got add() back and is then SIGKILLed leaves the class on disk."""
    script = textwrap.dedent(f"""
        import os, signal
        from serving.classes import ClassRegistry
        from serving.tokenizer import ClipTokenizer, default_vocab_path
        reg = ClassRegistry({str(tmp_path)!r}, {INITIAL!r}, tokenizer=ClipTokenizer(default_vocab_path()),
                            template={TEMPLATE!r})
        reg.add(["zebra"])
        print("acknowledged", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "acknowledged" in proc.stdout
    tok = ClipTokenizer(default_vocab_path())
    reg = ClassRegistry(tmp_path, ["other"], tokenizer=tok, template=TEMPLATE)
    assert reg.names() == [*INITIAL, "zebra"] and reg.version == 2


def test_a_lost_state_file_is_refused_unless_starting_empty(tmp_path, make):
    """Issue 16: a state dir that once held classes.json but lost it does not start silently from the bundle."""
    from serving.classes import MARKER_FILE

    reg = make(tmp_path)
    reg.add(["zebra"])
    assert (tmp_path / MARKER_FILE).exists()
    (tmp_path / STATE_FILE).unlink()
    with pytest.raises(ClassStateError, match="is missing.*--start-empty"):
        make(tmp_path)
    assert not (tmp_path / STATE_FILE).exists()
    assert make(tmp_path, start_empty=True).names() == INITIAL
    assert make(tmp_path / "new").names() == INITIAL  # a fresh directory needs no flag
