"""The PROJECTOR's files: the same bytes as ``SummaryWriter.add_embedding``, and a config that keeps earlier fits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from PIL import Image
from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig
from torch.utils.tensorboard import SummaryWriter

from xaiwatch.logging import Tags, XaiWriter
from xaiwatch.logging.projector import embedding_subdir, import_embeddings, write_embedding

HEADER = ["class", "source", "outcome"]


def _points(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n, 24, generator=gen)
    metadata = [[f"class {i % 3}", "gt" if i % 2 else "det", ["tp", "fp", "fn"][i % 3]] for i in range(n)]
    thumbnails = torch.rand(n, 3, 12, 12, generator=gen)
    return features, metadata, thumbnails


def _config(log_dir) -> list:
    return list(text_format.Parse((log_dir / "projector_config.pbtxt").read_text(), ProjectorConfig()).embeddings)


@pytest.mark.parametrize("n", [1, 7, 50])
def test_files_equal_add_embeddings_own(tmp_path, n):
    features, metadata, thumbnails = _points(n)
    tag = Tags.projection("neck.p3")
    with SummaryWriter(str(tmp_path / "theirs")) as sw:
        sw.add_embedding(
            features, metadata=metadata, label_img=thumbnails, global_step=4, tag=tag, metadata_header=HEADER
        )
    folder = write_embedding(tmp_path / "ours", tag, 4, features, metadata, HEADER, thumbnails)
    theirs = tmp_path / "theirs" / embedding_subdir(tag, 4)
    assert folder == tmp_path / "ours" / embedding_subdir(tag, 4) and theirs.is_dir()
    for name in ("tensors.tsv", "metadata.tsv"):
        assert (folder / name).read_bytes() == (theirs / name).read_bytes()
    assert np.array_equal(np.asarray(Image.open(folder / "sprite.png")), np.asarray(Image.open(theirs / "sprite.png")))
    (ours,), (ref,) = _config(tmp_path / "ours"), _config(tmp_path / "theirs")
    assert (ours.tensor_path, ours.metadata_path, ours.sprite.image_path) == (
        ref.tensor_path,
        ref.metadata_path,
        ref.sprite.image_path,
    )
    assert list(ours.sprite.single_image_dim) == list(ref.sprite.single_image_dim) == [12, 12]
    assert ours.tensor_name == f"{tag} (last: step 4)"  # the last epoch opens first (order_projector_config)


def test_a_resumed_fits_writer_keeps_the_earlier_epochs_in_the_config(tmp_path):
    """A new writer on the same log directory (a resumed fit) adds its epochs to those on disk; a step written again
    replaces its entry; the user's own add_embedding on that writer afterwards keeps them all."""
    features, metadata, thumbnails = _points(9)
    with SummaryWriter(str(tmp_path)) as sw:
        writer = XaiWriter(sw)
        writer.embedding("neck.p3", features, metadata, HEADER, thumbnails, 0)
        writer.embedding("neck.p3", features, metadata, HEADER, thumbnails, 2)
    with SummaryWriter(str(tmp_path)) as sw:  # the resumed fit: a new process, a new writer
        writer = XaiWriter(sw)
        writer.embedding("neck.p3", features, metadata, HEADER, thumbnails, 2)
        writer.embedding("neck.p3", features, metadata, HEADER, thumbnails, 4)
        sw.add_embedding(features, tag="mine", global_step=1)
    paths = sorted(e.tensor_path for e in _config(tmp_path))
    tag = Tags.projection("neck.p3")
    expected = [f"{embedding_subdir(tag, s)}/tensors.tsv" for s in (0, 2, 4)] + [
        f"{embedding_subdir('mine', 1)}/tensors.tsv"
    ]
    assert paths == sorted(expected)
    names = {e.tensor_path: e.tensor_name for e in _config(tmp_path)}
    assert names[f"{embedding_subdir(tag, 4)}/tensors.tsv"] == f"{tag} (last: step 4)"


def test_rows_that_do_not_match_are_refused(tmp_path):
    features, metadata, thumbnails = _points(5)
    with pytest.raises(ValueError, match="4 metadata rows for 5 vectors"):
        write_embedding(tmp_path, "t", 0, features, metadata[:4])
    with pytest.raises(ValueError, match="header's 2 columns"):
        write_embedding(tmp_path, "t", 0, features, metadata, ["a", "b"])
    with pytest.raises(ValueError, match=r"\(N, C, h, w\) with N = 5"):
        write_embedding(tmp_path, "t", 0, features, metadata, HEADER, thumbnails[:3])
    with pytest.raises(ValueError, match=r"must be \(N, D\)"):
        write_embedding(tmp_path, "t", 0, features[0])


def test_an_earlier_runs_embeddings_are_copied_into_the_resumed_runs_folder(tmp_path):
    """The PROJECTOR refuses files outside its config's folder, so a resumed fit in a new version folder copies the
    earlier epochs of its own tags; writing a step again there leaves the earlier run's file as it was."""
    features, metadata, thumbnails = _points(6)
    old, new = tmp_path / "version_0", tmp_path / "version_1"
    tag = Tags.projection("neck.p3")
    for step in (0, 2):
        write_embedding(old, tag, step, features, metadata, HEADER, thumbnails)
    write_embedding(old, "someone else's", 2, features)
    write_embedding(new, tag, 4, features * 2, metadata, HEADER, thumbnails)
    assert import_embeddings(new, old, Tags.projection("")) == 2
    assert import_embeddings(new, old, Tags.projection("")) == 0  # already listed
    assert import_embeddings(old, old, Tags.projection("")) == 0
    paths = sorted(e.tensor_path for e in _config(new))
    assert paths == sorted(f"{embedding_subdir(tag, s)}/tensors.tsv" for s in (0, 2, 4))
    for s in (0, 2):
        for name in ("tensors.tsv", "metadata.tsv", "sprite.png"):
            assert (new / embedding_subdir(tag, s) / name).read_bytes() == (
                old / embedding_subdir(tag, s) / name
            ).read_bytes()
    before = (old / embedding_subdir(tag, 2) / "tensors.tsv").read_bytes()
    write_embedding(new, tag, 2, features * 3, metadata, HEADER, thumbnails)  # the resumed fit redoes step 2
    assert (old / embedding_subdir(tag, 2) / "tensors.tsv").read_bytes() == before
    assert _config(new)[0].tensor_name == f"{tag} (last: step 4)"
