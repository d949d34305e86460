"""Nothing a user has is overwritten or deleted: every writer refuses a folder it did not create, byte for byte.

Each test puts user files where a writer would write, runs it, and compares the SHA-256 of every file before and
after (and the error message).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from xaiwatch.cli import main
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.core.outputs import MARKER, claim_files, is_output_folder, prepare_output_folder, seal_output_folder
from xaiwatch.data import generate, generate_classification, write_counterfactual

SMALL = {"num_train": 2, "num_val": 2, "imgsz": 64, "object_size": (8, 16)}


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _user_dataset(root: Path) -> dict[str, str]:
    """A user's ultralytics dataset in ``root``: images, labels and dataset.yaml (the issue's DIR/data)."""
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(3):
            (root / "images" / split / f"{i:06d}.png").write_bytes(bytes([i]) * 100)  # same names as ours
            (root / "labels" / split / f"{i:06d}.txt").write_text(f"0 0.5 0.5 0.{i + 1} 0.2\n")
    (root / "dataset.yaml").write_text("train: images/train\nval: images/val\nnames: [mine]\n")
    return _hashes(root)


def test_demo_refuses_an_out_folder_with_user_files(tmp_path, capsys):
    out = tmp_path / "project"
    _user_dataset(out / "data")
    before = _hashes(out)
    code = main(["demo", "--out", str(out), "--epochs", "1", "--num-train", "2", "--num-val", "2", "--imgsz", "64"])
    err = capsys.readouterr().err
    assert code == 2
    assert "already holds files xaiwatch did not write (data/" in err and "--out" in err
    assert _hashes(out) == before  # every byte survives, nothing added
    assert not is_output_folder(out)


def test_demo_refuses_user_data_inside_its_own_output_folder(tmp_path, capsys):
    out = prepare_output_folder(tmp_path / "demo", what="the demo's output")  # an earlier demo's folder ...
    before = _user_dataset(out / "data")  # ... where the user then put their own dataset
    code = main(["demo", "--out", str(out), "--epochs", "1", "--num-train", "2", "--num-val", "2", "--imgsz", "64"])
    assert code == 2
    assert f"{out / 'data'} already holds files xaiwatch did not write" in capsys.readouterr().err
    assert _hashes(out / "data") == before
    assert not (out / "tensorboard").exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_generate_refuses_a_user_folder_even_with_overwrite(tmp_path, overwrite):
    before = _user_dataset(tmp_path / "data")
    with pytest.raises(ConfigurationError, match="xaiwatch did not write.*overwrite=True does not change that"):
        generate(tmp_path / "data", overwrite=overwrite, **SMALL)
    assert _hashes(tmp_path / "data") == before


def test_generate_refuses_a_single_unknown_file(tmp_path):
    (tmp_path / "notes.txt").write_text("my notes")
    with pytest.raises(ConfigurationError, match=r"notes\.txt"):
        generate(tmp_path, **SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_generate_overwrite_removes_only_its_own_files(tmp_path):
    root = generate(tmp_path / "d", **{**SMALL, "num_train": 3}).parent
    (root / "images" / "train" / "user.png").write_bytes(b"user image")
    (root / "README.md").write_text("user notes")
    user = {k: v for k, v in _hashes(root).items() if k in ("images/train/user.png", "README.md")}
    generate(root, overwrite=True, **{**SMALL, "num_train": 1})
    after = _hashes(root)
    assert {k: after[k] for k in user} == user
    assert sorted(p.name for p in (root / "images" / "train").iterdir()) == ["000000.png", "user.png"]
    assert sorted(json.loads((root / MARKER).read_text())["files"]) == sorted(
        ["dataset.yaml", "meta/info.json", "meta/train.json", "meta/val.json"]
        + [
            f"{d}/{s}/{i:06d}.{e}"
            for d, e in (("images", "png"), ("labels", "txt"))
            for s, n in (("train", 1), ("val", 2))
            for i in range(n)
        ]
    )


def test_generate_overwrite_keeps_a_file_the_user_edited(tmp_path):
    root = generate(tmp_path / "d", **SMALL).parent
    label = root / "labels" / "val" / "000000.txt"
    label.write_text("0 0.5 0.5 0.1 0.1\n")  # the user corrected a label
    before = _hashes(root)
    with pytest.raises(ConfigurationError, match="changed since.*labels/val/000000.txt"):
        generate(root, overwrite=True, **SMALL)
    assert _hashes(root) == before  # nothing was deleted, not even the unchanged files


def test_generate_refuses_a_user_file_at_a_path_it_would_write(tmp_path):
    root = generate(tmp_path / "d", **{**SMALL, "num_train": 1}).parent
    (root / "images" / "train" / "000001.png").write_bytes(b"user")  # not written by xaiwatch
    with pytest.raises(ConfigurationError, match="did not write where it would write.*images/train/000001.png"):
        generate(root, overwrite=True, **SMALL)
    assert (root / "images" / "train" / "000001.png").read_bytes() == b"user"


def test_generate_overwrite_replaces_nested_counterfactuals(tmp_path):
    root = generate(tmp_path / "d", shortcut="marker", **SMALL).parent
    cf = write_counterfactual(root, "wrong").parent
    assert cf == root / "counterfactual_wrong" and is_output_folder(cf)
    generate(root, overwrite=True, **SMALL)
    assert not cf.exists()  # stale counterfactuals of the old dataset are gone (they were ours)


def test_counterfactual_refuses_user_folders(tmp_path):
    root = generate(tmp_path / "d", shortcut="marker", **SMALL).parent
    mine = tmp_path / "mine"
    before = _user_dataset(mine)
    with pytest.raises(ConfigurationError, match="xaiwatch did not write"):
        write_counterfactual(root, "wrong", out=mine)
    assert _hashes(mine) == before
    (root / "counterfactual_absent").mkdir()
    (root / "counterfactual_absent" / "keep.txt").write_text("user")
    with pytest.raises(ConfigurationError, match=r"keep\.txt"):
        write_counterfactual(root, "absent")
    assert (root / "counterfactual_absent" / "keep.txt").read_text() == "user"


def test_counterfactual_rewrite_replaces_only_its_split(tmp_path):
    root = generate(tmp_path / "d", shortcut="marker", **SMALL).parent
    out = tmp_path / "cf"
    write_counterfactual(root, "wrong", out=out, split="train")
    write_counterfactual(root, "wrong", out=out, split="val")
    write_counterfactual(root, "wrong", out=out, split="val")  # its own files: replaced
    assert sorted(p.name for p in (out / "images").iterdir()) == ["train", "val"]
    assert len(list((out / "images" / "val").iterdir())) == 2


def test_classification_generator_refuses_user_folders(tmp_path):
    mine = tmp_path / "cls"
    (mine / "train" / "cat").mkdir(parents=True)
    (mine / "train" / "cat" / "1.jpg").write_bytes(b"cat")
    before = _hashes(mine)
    with pytest.raises(ConfigurationError, match="xaiwatch did not write"):
        generate_classification(mine, num_train=2, num_val=2, overwrite=True)
    assert _hashes(mine) == before
    root = generate_classification(tmp_path / "ok", num_train=4, num_val=2, classes=("circle", "square", "star"))
    generate_classification(root, num_train=2, num_val=2, classes=("circle", "square"), overwrite=True)
    assert sorted(p.name for p in (root / "train").iterdir()) == ["circle", "square"]  # no stale class folder


def test_output_folder_primitives(tmp_path):
    with pytest.raises(ConfigurationError, match="is a file"):
        (tmp_path / "f").write_text("x")
        prepare_output_folder(tmp_path / "f", what="x")
    root = prepare_output_folder(tmp_path / "o", what="x")
    with pytest.raises(ConfigurationError, match="relative path"):
        claim_files(root, ["../escape.txt"])
    with pytest.raises(ConfigurationError, match="not an xaiwatch output folder"):
        claim_files(tmp_path, ["a.txt"])
    (a,) = claim_files(root, ["sub/a.txt"])
    a.write_text("ours")
    seal_output_folder(root)
    with pytest.raises(ConfigurationError, match="pass overwrite=True"):
        prepare_output_folder(root, what="x")
    assert prepare_output_folder(root, what="x", keep=True) == root and a.exists()
    prepare_output_folder(root, what="x", overwrite=True)
    assert sorted(p.name for p in root.iterdir()) == [MARKER]  # the file and the folder it created are gone
    (root / MARKER).write_text("{broken")
    with pytest.raises(ConfigurationError, match="not a valid xaiwatch marker"):
        prepare_output_folder(root, what="x", overwrite=True)
