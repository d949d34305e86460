"""ProjectionCallback end to end: projector files, pictures and scalars, no side effects, resume, bad input."""

from __future__ import annotations

import csv
import math
import pickle
import warnings
from pathlib import Path
from unittest.mock import Mock, patch

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import SquaresDataset, collate, tiny_cfg
from helpers import make_trainer as _trainer
from helpers import read_events as _events
from helpers import tiny_module as _module
from xaiwatch.callbacks import ProjectionCallback, load_callbacks
from xaiwatch.core import imports
from xaiwatch.core.errors import ConfigurationError, MissingDependencyError
from xaiwatch.models import YOLOv8Module

PRESET = Path(__file__).resolve().parents[1] / "callbacks" / "projection-default.yaml"


def _projector(log_dir: Path) -> list:
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    config = text_format.Parse((log_dir / "projector_config.pbtxt").read_text(), ProjectorConfig())
    return list(config.embeddings)


@pytest.mark.parametrize("inference_mode", [True, False])
def test_projector_pictures_and_scalars_per_epoch(tmp_path, square_loaders, inference_mode):
    cb = ProjectionCallback(layers=["neck.p3", "neck.p5"], method="tsne", perplexity=4, on_error="raise")
    trainer = _trainer(tmp_path, [cb], inference_mode=inference_mode)
    trainer.fit(_module(), *square_loaders)
    log_dir = Path(trainer.logger.log_dir)
    embeddings = _projector(log_dir)
    assert sorted(e.tensor_name for e in embeddings) == sorted(
        [f"projection/{layer}:{step:05d}" for layer in ("neck.p3", "neck.p5") for step in (0, 2)]
        + [f"projection/{layer} (last: step 4)" for layer in ("neck.p3", "neck.p5")]  # the PROJECTOR opens on it
    )
    for e in embeddings:
        with open(log_dir / e.tensor_path) as f:
            tensors = [row for row in csv.reader(f, delimiter="\t")]
        with open(log_dir / e.metadata_path) as f:
            metadata = [row for row in csv.reader(f, delimiter="\t")]
        n = len(tensors)
        assert n >= 8 and len(metadata) == n + 1  # header + one row per point; every ground-truth box is a point
        assert metadata[0] == ["class", "source", "outcome", "score", "image", "epoch"]
        assert {len(r) for r in tensors} == {16 if "p3" in e.tensor_name else 64}  # channels of the layer
        name = e.tensor_name  # steps 0 / 2 / 4 are epochs 0 / 1 / 2
        epoch = "2" if name.endswith("(last: step 4)") else {"00000": "0", "00002": "1"}[name.rsplit(":", 1)[-1]]
        assert sum(r[1] == "gt" for r in metadata[1:]) == 8 and {r[5] for r in metadata[1:]} == {epoch}
        assert {r[2] for r in metadata[1:]} <= {"GT detected", "GT missed", "TP", "FP"}
        sprite = Image.open(log_dir / e.sprite.image_path)
        side = math.ceil(math.sqrt(n))
        assert list(e.sprite.single_image_dim) == [32, 32] and sprite.size == (32 * side, 32 * side)
    acc = _events(log_dir)
    for layer in ("neck.p3", "neck.p5"):
        images = acc.Images(f"projection/{layer}")
        assert [e.step for e in images] == [0, 2, 4]
        assert all(np.asarray(Image.open(__import__("io").BytesIO(e.encoded_image_string))).std() > 5 for e in images)
        assert [e.step for e in acc.Scalars(f"projection/{layer}/silhouette")] == [0, 2, 4]
        knn = [e.value for e in acc.Scalars(f"projection/{layer}/knn_accuracy")]
        assert [round(v, 5) for v in knn] == [round(cb.history[layer][s]["knn_accuracy"], 5) for s in (0, 2, 4)]
        assert [e.step for e in acc.Scalars(f"projection/{layer}/displacement")] == [2, 4]  # nothing to compare at 0
    assert [e.step for e in acc.Scalars("xaiwatch/projection_seconds")] == [0, 2, 4]


def test_max_points_keeps_ground_truth_and_the_best_predictions(tmp_path, square_loaders):
    from xaiwatch.adapters import YOLOv8Adapter

    module = _module()
    reference = YOLOv8Adapter(_module().net, conf=0.001)  # the same initial weights, for step 0
    cb = ProjectionCallback(layers="neck.p3", max_points=6, adapter=YOLOv8Adapter(module.net, conf=0.001))
    cb.on_error = "raise"
    trainer = _trainer(tmp_path, [cb], epochs=1)
    trainer.fit(module, *square_loaders)
    (embedding,) = [e for e in _projector(Path(trainer.logger.log_dir)) if e.tensor_name.endswith(":00000")]
    with open(Path(trainer.logger.log_dir) / embedding.metadata_path) as f:
        rows = list(csv.reader(f, delimiter="\t"))[1:]
    chosen = cb.state_dict()["probe_indices"]
    assert len(chosen) == 3 and len(rows) == 6 and sum(r[1] == "gt" for r in rows) == 3
    images = torch.stack([square_loaders[1].dataset[i]["image"] for i in chosen])
    scores = torch.cat([d.scores for d in reference.detect(images)])
    assert len(scores) > 3
    best = sorted((float(r[3]) for r in rows if r[1] == "pred"), reverse=True)
    assert best == pytest.approx(scores.sort(descending=True).values[:3].tolist(), abs=1e-3)


def _weights_after_fit(tmp_path, square_loaders, callbacks):
    module = _module()
    _trainer(tmp_path, callbacks).fit(module, *square_loaders)
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_training_bit_identical_with_and_without_callback(tmp_path, square_loaders):
    plain = _weights_after_fit(tmp_path / "a", square_loaders, [])
    cb = ProjectionCallback(method="tsne", perplexity=4, level="box", on_error="raise")
    projected = _weights_after_fit(tmp_path / "b", square_loaders, [cb])
    assert sorted(cb.history["neck.p3"]) == [0, 2, 4]  # it really ran
    assert any("running_mean" in k for k in plain)
    for k in plain:
        assert torch.equal(plain[k], projected[k]), k


def test_run_leaves_module_state_rng_and_hooks_unchanged(tmp_path, square_loaders):
    cb = ProjectionCallback(level="image", on_error="raise")
    module = _module()
    _trainer(tmp_path, [cb], epochs=1).fit(module, *square_loaders)
    module.train()
    module.net.model[3].eval()  # a user-frozen layer
    modes = [m.training for m in module.modules()]
    state = {k: v.clone() for k, v in module.state_dict().items()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
    module.net.model[0].conv.weight.grad = torch.full_like(module.net.model[0].conv.weight, 2.0)
    grads = [None if p.grad is None else p.grad.clone() for p in module.parameters()]
    rng, np_rng = torch.get_rng_state(), np.random.get_state()[1].copy()
    with torch.inference_mode():
        values = cb.run(module.device, step=7)
    assert set(values) == {"neck.p3", "neck.p4", "neck.p5"} and 7 in cb.history["neck.p4"]
    assert [m.training for m in module.modules()] == modes
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in state.items())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules()) == hooks
    assert torch.equal(rng, torch.get_rng_state()) and np.array_equal(np_rng, np.random.get_state()[1])
    after = [None if p.grad is None else p.grad.clone() for p in module.parameters()]
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads, after))


def test_state_dict_resume_and_pickle(tmp_path, square_loaders):
    cb = ProjectionCallback(layers="neck.p3", max_points=8, seed=5, on_error="raise")
    _trainer(tmp_path, [cb], epochs=1).fit(_module(), *square_loaders)
    state = cb.state_dict()
    assert len(state["probe_indices"]) == 4  # 1 box per image, max_points // 2 boxes
    assert len(state["layouts"]["neck.p3"]) == 4 and state["last_step"] == 2
    restored = pickle.loads(pickle.dumps(ProjectionCallback(layers="neck.p3", max_points=8, seed=99)))
    restored.load_state_dict(state)
    _trainer(tmp_path, [restored], epochs=1).fit(_module(), *square_loaders)
    assert restored.state_dict()["probe_indices"] == state["probe_indices"]  # same images despite another seed
    assert not math.isnan(restored.history["neck.p3"][2]["displacement"])  # aligned onto the restored layout
    assert ProjectionCallback(method="pca").state_key != ProjectionCallback(method="tsne").state_key
    restored.load_state_dict({})


def test_bad_arguments_fail_at_construction(monkeypatch):
    with pytest.raises(ConfigurationError, match="`method` can be pca, tsne, umap, got 'lda'"):
        ProjectionCallback(method="lda")
    with pytest.raises(ConfigurationError, match="`level` can be box or image"):
        ProjectionCallback(level="pixel")
    with pytest.raises(ConfigurationError, match="perplexity=50.0` must be smaller than the number of points \\(40\\)"):
        ProjectionCallback(method="tsne", perplexity=50, max_points=40)
    with pytest.raises(ConfigurationError, match="every_n_epochs"):
        ProjectionCallback(every_n_epochs=0)
    with pytest.raises(ConfigurationError, match="distinct layers"):
        ProjectionCallback(layers=["neck.p3", "neck.p3"])
    with pytest.raises(ConfigurationError, match="sprite"):
        ProjectionCallback(max_points=100_000)
    with pytest.raises(ConfigurationError, match="on_error"):
        ProjectionCallback(on_error="ignore")
    monkeypatch.setattr(imports, "available", lambda module: module != "umap")
    with pytest.raises(MissingDependencyError, match=r"umap.*pip install 'xaiwatch\[umap\]'"):
        ProjectionCallback(method="umap")


def test_bad_setup_fails_before_training(tmp_path, square_loaders):
    train, val = square_loaders
    with pytest.raises(ConfigurationError, match="Unknown layer 'neck.p7'.*neck.p3"):
        _trainer(tmp_path, [ProjectionCallback(layers=["neck.p7"])]).fit(_module(), train, val)
    with pytest.raises(ConfigurationError, match="`max_points=4` is below the number of classes \\(5\\)"):
        _trainer(tmp_path, [ProjectionCallback(max_points=4)]).fit(_module(num_classes=5), train, val)
    with pytest.raises(ConfigurationError, match="perplexity=10.0` must be smaller than the number of points \\(8\\)"):
        _trainer(tmp_path, [ProjectionCallback(method="tsne", perplexity=10)]).fit(_module(), train, val)
    with pytest.raises(ConfigurationError, match="no validation dataloader"):
        _trainer(tmp_path, [ProjectionCallback()]).fit(_module(), train)
    with pytest.raises(ConfigurationError, match="no `TensorBoardLogger`"):
        _trainer(tmp_path, [ProjectionCallback()], logger=False).fit(_module(), train, val)


def test_errors_during_training_are_isolated(tmp_path, square_loaders):
    boom = RuntimeError("projection exploded")
    with patch("xaiwatch.callbacks.projection.embed", side_effect=boom):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = _trainer(tmp_path, [ProjectionCallback()])
            trainer.fit(_module(), *square_loaders)
        assert trainer.current_epoch == 2
        assert any("projection exploded" in str(w.message) for w in caught)
        with pytest.raises(RuntimeError, match="projection exploded"):
            _trainer(tmp_path, [ProjectionCallback(on_error="raise")]).fit(_module(), *square_loaders)


def test_non_zero_rank_embeds_its_share_and_writes_nothing(tmp_path, square_loaders):
    cb = ProjectionCallback(on_error="raise")
    trainer = _trainer(tmp_path, [cb], epochs=1)
    module = _module()
    trainer.fit(module, *square_loaders)
    cb._writer = None  # what setup() gives a non-zero rank
    rank1 = Mock(is_global_zero=False, sanity_checking=False, fast_dev_run=False, current_epoch=3, global_step=9)
    rank1.global_rank, rank1.world_size = 1, 2
    rank1.state.fn = "fit"
    with patch.object(cb, "_embed", wraps=cb._embed) as embed, patch.object(cb, "_project") as project:
        cb.on_validation_epoch_end(rank1, module)
    assert embed.call_args[0][1] == cb.indices[1::2]  # its share of the images, every other one
    project.assert_not_called()  # projecting and writing are rank zero's
    assert cb.state_dict()["last_step"] == 9  # every rank keeps the same schedule state


def test_preset_loads_and_runs(tmp_path, square_loaders):
    (cb,) = load_callbacks(PRESET)
    assert isinstance(cb, ProjectionCallback)
    cb.on_error = "raise"
    _trainer(tmp_path, [cb], epochs=1).fit(_module(), *square_loaders)
    assert sorted(cb.history) == ["neck.p3", "neck.p4", "neck.p5"] and sorted(cb.history["neck.p3"]) == [0, 2]


class TexturedSquares(SquaresDataset):
    """One square per image in a random colour; the class is its texture: filled, framed or striped."""

    def __init__(self, n: int, seed: int, size: int = 64) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            img = torch.rand(3, size, size, generator=g) * 0.3
            s, c = size // 3, i % 3
            x, y = torch.randint(0, size - s, (2,), generator=g).tolist()
            patch = (torch.rand(3, generator=g) * 0.6 + 0.4)[:, None, None].expand(3, s, s).clone()
            if c == 1:
                patch[:, 3:-3, 3:-3] = img[:, y + 3 : y + s - 3, x + 3 : x + s - 3]
            elif c == 2:
                patch[:, ::4, :] = img[:, y : y + s : 4, x : x + s]
            img[:, y : y + s, x : x + s] = patch
            box = torch.tensor([[x, y, x + s, y + s]], dtype=torch.float32)
            self.items.append({"image": img, "boxes": box, "labels": torch.tensor([c]), "index": i, "path": f"#{i}"})


@pytest.mark.slow
def test_classes_separate_after_brief_training(tmp_path):
    """60 short epochs: the ground-truth objects' P3 features separate by class more than at initialisation.

    The class is a texture in a random colour, so an untrained network's features do not separate it (a colour
    per class would separate already at initialisation). About 15 s on 2 idle CPU cores.
    """
    cb = ProjectionCallback(layers=["neck.p3"], every_n_epochs=60, projector=False, on_error="raise")
    trainer = _trainer(tmp_path, [cb], epochs=60, limit_train_batches=None, check_val_every_n_epoch=60)
    pl.seed_everything(0)
    module = YOLOv8Module(tiny_cfg(), num_classes=3, lr=1e-2, warmup_steps=5)
    train = DataLoader(TexturedSquares(64, 0), batch_size=8, collate_fn=collate, shuffle=True)
    trainer.fit(module, train, DataLoader(TexturedSquares(48, 1), batch_size=8, collate_fn=collate))
    acc = _events(trainer.logger.log_dir)
    silhouette = {e.step: e.value for e in acc.Scalars("projection/neck.p3/silhouette")}
    knn = {e.step: e.value for e in acc.Scalars("projection/neck.p3/knn_accuracy")}
    assert sorted(silhouette) == [0, trainer.global_step]
    last = trainer.global_step
    assert silhouette[0] < 0.05 and silhouette[last] > silhouette[0] + 0.15
    assert knn[last] > knn[0]
