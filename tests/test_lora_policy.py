"""Who may name which LoRA (editing/lora_library/files.py): clients of the app by library name only (no server
path, no pickle even with --allow-pickle, messages that never say whether a path exists); library names
are never overwritten without ``replace=True``; writes are atomic; at most MAX_LORAS per request."""
import pickle

import numpy as np
import pytest
import torch

from editing import lora_library as lib
from editing.engine import Editor
from editing.images import atomic_write
from models.errors import EditError
from tests.test_lora_library import _peft_lora, save_diffusers_lora


@pytest.fixture(autouse=True)
def lora_dir(tmp_path, monkeypatch):
    d = tmp_path / "loras"
    monkeypatch.setenv(lib.ENV_DIR, str(d))
    d.mkdir()
    return d


class Payload:
    """Unpickling this touches ``marker``: proof that a pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture
def evil(tmp_path):
    """A client's upload: a .pt whose loading runs code (it creates ``ran``)."""
    marker = tmp_path / "ran"
    path = tmp_path / "uploads" / "evil.pt"
    path.parent.mkdir()
    with open(path, "wb") as f:
        pickle.dump({"lora.weight": Payload(marker)}, f)
    return path, marker


@pytest.fixture
def subject(bundle, lora_dir):
    return save_diffusers_lora(lora_dir / "subject.safetensors", _peft_lora(bundle.unet, seed=1))


@pytest.fixture(scope="module")
def app_editor(bundle):
    """The app's Editor: --allow-pickle given by the operator, LoRA paths not trusted (what app.py should pass)."""
    ed = Editor("tiny", allow_pickle=True, trust_lora_paths=False)
    ed._bundle = bundle  # the session's loaded tiny model, shared
    return ed


def _generate(editor, **kw):
    from editing.generation import GenerateRequest

    return editor.edit(GenerateRequest("a toy", width=64, height=64, n_inference_steps=2, seed=3), **kw)


def test_pickle_by_uploaded_path_never_runs_for_a_client(app_editor, evil, subject):
    path, marker = evil
    for spec in (str(path), path, f"{path}", "../uploads/evil.pt", "evil.pt"):
        with pytest.raises(EditError, match="not a library name|No LoRA named"):
            _generate(app_editor, loras=[(spec, 1.0)])
    with pytest.raises(EditError, match="only .safetensors"):
        lib.add_to_library(path, allow_pickle=True, trusted=False)  # /add_lora with the upload
    with pytest.raises(EditError):
        lib.resolve(str(path), allow_pickle=True, trusted=False)
    with pytest.raises(EditError):
        with lib.activate(app_editor.bundle, [(str(path), 1.0)], allow_pickle=True, trusted=False):
            pass
    assert not marker.exists()
    # a recipe a client sends is held to the same rule
    recipe = _generate(app_editor, loras=[("subject", 1.0)]).recipe
    recipe["loras"] = [[str(path), 1.0]]
    with pytest.raises(EditError, match="not a library name"):
        app_editor.replay(recipe)
    assert not marker.exists()


def test_trusted_caller_keeps_paths_and_its_pickle_switch(bundle, evil, subject, tmp_path):
    """The CLI / operator config may still name files; pickles still need --allow-pickle."""
    path, marker = evil
    assert lib.resolve(str(subject)) == subject
    with pytest.raises(EditError, match="allow-pickle|pickle"):
        lib.resolve(str(path))
    assert not marker.exists()


def test_messages_never_reveal_whether_a_server_path_exists(tmp_path):
    real = tmp_path / "there.safetensors"
    real.write_bytes(b"x")
    folder = tmp_path / "afolder"
    folder.mkdir()
    messages = set()
    for spec in (str(real), str(tmp_path / "missing.safetensors"), str(folder), str(tmp_path / "nofolder"),
                 "/etc/passwd", "/root", "/nonexistent/x"):
        with pytest.raises(EditError) as e:
            lib.library_file(spec)
        messages.add(str(e.value).replace(spec if len(spec) <= 40 else spec[:37] + "...", "SPEC"))
    assert len(messages) == 1, messages
    assert "SPEC" in messages.pop()


def test_library_names_work_for_clients_and_give_the_trusted_result(app_editor, bundle, subject):
    trusted = _generate(app_editor, loras=[(str(subject), 0.8)], trusted=True)
    client = _generate(app_editor, loras=[("subject", 0.8)])
    assert [tuple(x) for x in client.recipe["loras"]] == [("subject", 0.8)]  # the name, not a server path
    np.testing.assert_array_equal(np.asarray(trusted.image), np.asarray(client.image))
    with pytest.raises(EditError, match=r"No LoRA named 'nope' in the library \(available: subject\)"):
        _generate(app_editor, loras=[("nope", 1.0)])


def test_too_many_loras_or_bad_weights_are_refused_before_any_work(app_editor, subject):
    with pytest.raises(EditError, match=f"50 LoRAs in one request; at most {lib.MAX_LORAS}"):
        app_editor.check_loras([("subject", 0.1)] * 50)
    for w in (float("nan"), float("inf"), 99, "abc", True):
        with pytest.raises(EditError, match="weight must be a number"):
            app_editor.check_loras([("subject", w)])
    assert app_editor.check_loras([("subject", "0.5")]) == (("subject", 0.5),)


def test_add_to_library_never_overwrites_a_name_unless_asked(bundle, tmp_path, lora_dir):
    from safetensors.torch import load_file

    first = save_diffusers_lora(tmp_path / "dog.safetensors", _peft_lora(bundle.unet, seed=1))
    second = save_diffusers_lora(tmp_path / "up" / "dog.safetensors", _peft_lora(bundle.unet, seed=2))
    info = lib.add_to_library(first, trusted=False)
    assert info.name == "dog"
    before = load_file(str(info.path))
    with pytest.raises(EditError, match="A LoRA named 'dog' is already in the library"):
        lib.add_to_library(second, trusted=False)
    kept = load_file(str(info.path))
    assert all(torch.equal(before[k], kept[k]) for k in before)  # the other user's LoRA is untouched
    lib.add_to_library(second, replace=True, trusted=False)
    new = load_file(str(info.path))
    assert any(not torch.equal(before[k], new[k]) for k in before)
    assert not [p for p in lora_dir.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    folder = tmp_path / "atomic"
    folder.mkdir()
    target = folder / "x.safetensors"
    target.write_bytes(b"old")

    def torn(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, torn)
    assert target.read_bytes() == b"old" and list(folder.iterdir()) == [target]
    with pytest.raises(FileExistsError):
        atomic_write(target, lambda tmp: tmp.write_bytes(b"new"), replace=False)
    assert target.read_bytes() == b"old" and list(folder.iterdir()) == [target]
    atomic_write(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"new"


def test_allow_pickle_never_reaches_an_untrusted_request(app_editor):
    """--allow-pickle is the operator's: a client's request runs with it off (LoRAs, ControlNets, adapters)."""
    assert app_editor.allow_pickle  # the operator's switch, for the base model and trusted calls
    assert app_editor._options_for(None).allow_pickle is False
    assert app_editor._options_for(True).allow_pickle is True
