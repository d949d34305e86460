"""ExplainCallback end to end: TensorBoard content, no side effects on training, resume, bad input, ranks."""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from unittest.mock import Mock, patch

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader

from conftest import SquaresDataset, collate
from helpers import make_trainer as _trainer
from helpers import read_events as _events
from helpers import tiny_module as _module
from xaiwatch.callbacks import ExplainCallback
from xaiwatch.core.errors import ConfigurationError, UnsupportedModelError


@pytest.mark.parametrize("inference_mode", [True, False])
def test_tensorboard_images_per_epoch_per_probe(tmp_path, square_loaders, inference_mode):
    cb = ExplainCallback(methods=["saliency", "grad_cam"], num_probe=3, on_error="raise")
    trainer = _trainer(tmp_path, [cb], inference_mode=inference_mode)
    trainer.fit(_module(), *square_loaders)
    acc = _events(trainer.logger.log_dir)
    tags = {t for t in acc.Tags()["images"] if t.startswith("explain/")}
    expected = {f"explain/{m}/probe_{i:02d}" for m in ("saliency", "grad_cam") for i in range(3)}
    assert tags == expected
    sizes = set()
    for tag in expected:
        events = acc.Images(tag)
        assert [e.step for e in events] == [0, 2, 4]  # before training, after epoch 1, after epoch 2 (global steps)
        for e in events:
            img = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
            assert (img.shape[0], img.shape[1]) == (e.height, e.width)
            assert img.std() > 10  # a real picture, not a blank canvas
            sizes.add(img.shape)
    assert len(sizes) == 1
    assert [e.step for e in acc.Scalars("xaiwatch/explain_seconds")] == [0, 2, 4]
    assert all(e.value > 0 for e in acc.Scalars("xaiwatch/explain_seconds"))
    assert len(acc.Scalars("explain_tracked/detected_probe_00")) == 3


def _weights_after_fit(tmp_path, square_loaders, callbacks):
    module = _module()
    _trainer(tmp_path, callbacks).fit(module, *square_loaders)
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_training_bit_identical_with_and_without_callback(tmp_path, square_loaders):
    plain = _weights_after_fit(tmp_path / "a", square_loaders, [])
    explained = _weights_after_fit(
        tmp_path / "b", square_loaders, [ExplainCallback(num_probe=4, on_error="raise", normalize="fixed")]
    )
    assert plain.keys() == explained.keys()
    assert any("running_mean" in k for k in plain)
    for k in plain:
        assert torch.equal(plain[k], explained[k]), k


def test_run_leaves_module_state_rng_and_hooks_unchanged(tmp_path, square_loaders):
    cb = ExplainCallback(num_probe=2, on_error="raise")
    module = _module()
    trainer = _trainer(tmp_path, [cb], epochs=1)
    trainer.fit(module, *square_loaders)
    module.train()
    module.net.model[3].eval()  # a user-frozen layer
    modes = [m.training for m in module.modules()]
    state = {k: v.clone() for k, v in module.state_dict().items()}
    hooks = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in module.modules())
    module.net.model[0].conv.weight.grad = torch.full_like(module.net.model[0].conv.weight, 2.0)  # a user's grad
    grads = [None if p.grad is None else p.grad.clone() for p in module.parameters()]
    rng = torch.get_rng_state()
    np_rng = np.random.get_state()[1].copy()
    with torch.inference_mode():
        cb._scheduled(trainer, module, epoch=7, force=True)
    assert [m.training for m in module.modules()] == modes
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in state.items())
    assert sum(len(m._forward_hooks) + len(m._backward_hooks) for m in module.modules()) == hooks
    assert torch.equal(rng, torch.get_rng_state()) and np.array_equal(np_rng, np.random.get_state()[1])
    after = [None if p.grad is None else p.grad.clone() for p in module.parameters()]
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads, after))


def test_state_dict_resume_and_pickle(tmp_path, square_loaders):
    cb = ExplainCallback(num_probe=3, seed=5, on_error="raise")
    _trainer(tmp_path, [cb], epochs=1).fit(_module(), *square_loaders)
    state = cb.state_dict()
    assert len(state["probe_indices"]) == 3 and len(state["tracked"]) == 3 and state["last_step"] == 2
    restored = pickle.loads(pickle.dumps(ExplainCallback(num_probe=3, seed=99)))
    restored.load_state_dict(state)
    _trainer(tmp_path, [restored], epochs=1).fit(_module(), *square_loaders)
    assert restored.state_dict()["probe_indices"] == state["probe_indices"]  # same images despite another seed
    assert restored.state_dict()["tracked"] == state["tracked"]
    assert ExplainCallback(methods=["saliency"]).state_key != ExplainCallback(methods=["grad_cam"]).state_key
    restored.load_state_dict({})  # older checkpoints without the keys load with defaults


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ConfigurationError, match="Valid methods:.*grad_cam"):
        ExplainCallback(methods=["saliency", "lime2"])
    with pytest.raises(ConfigurationError, match="`num_probe` must be an integer >= 1, got 0"):
        ExplainCallback(num_probe=0)
    with pytest.raises(ConfigurationError, match="every_n_epochs"):
        ExplainCallback(every_n_epochs=0)
    with pytest.raises(ConfigurationError, match="on_error"):
        ExplainCallback(on_error="ignore")
    with pytest.raises(ConfigurationError, match="normalize"):
        ExplainCallback(normalize="global")
    with pytest.raises(ConfigurationError, match="probe_indices"):
        ExplainCallback(probe_indices=[1, 1])


def test_bad_setup_fails_before_training(tmp_path, square_loaders):
    train, val = square_loaders
    with pytest.raises(ConfigurationError, match="only 8 images"):
        _trainer(tmp_path, [ExplainCallback(num_probe=9)]).fit(_module(), train, val)
    with pytest.raises(ConfigurationError, match="no validation dataloader"):
        _trainer(tmp_path, [ExplainCallback()]).fit(_module(), train)
    with pytest.raises(ConfigurationError, match="Unknown layer 'neck.p7'.*neck.p3"):
        _trainer(tmp_path, [ExplainCallback(layer="neck.p7")]).fit(_module(), train, val)
    with pytest.raises(ConfigurationError, match="no `TensorBoardLogger`"):
        t = _trainer(tmp_path, [ExplainCallback()], logger=False)
        t.fit(_module(), train, val)
    with pytest.raises(ConfigurationError, match="outside the validation set"):
        _trainer(tmp_path, [ExplainCallback(probe_indices=[0, 50])]).fit(_module(), train, val)

    class Plain(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(2, 2)

        def training_step(self, batch, batch_idx):
            return self.layer(batch["images"].mean((1, 2, 3))[:, None].repeat(1, 2)).sum()

        def validation_step(self, batch, batch_idx):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(UnsupportedModelError, match="xai_adapter"):
        _trainer(tmp_path, [ExplainCallback()]).fit(Plain(), train, val)


def test_errors_during_training_are_isolated(tmp_path, square_loaders):
    cb = ExplainCallback(num_probe=2)  # on_error="warn" by default
    boom = RuntimeError("engine exploded")
    with patch("xaiwatch.explain.gradients.SaliencyEngine.attribute_boxes", side_effect=boom):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = _trainer(tmp_path, [cb])
            trainer.fit(_module(), *square_loaders)
    assert trainer.current_epoch == 2  # training went on
    assert any("engine exploded" in str(w.message) for w in caught)
    strict = ExplainCallback(num_probe=2, on_error="raise")
    with patch("xaiwatch.explain.gradients.SaliencyEngine.attribute_boxes", side_effect=boom):
        with pytest.raises(RuntimeError, match="engine exploded"):
            _trainer(tmp_path, [strict]).fit(_module(), *square_loaders)


def test_non_zero_rank_explains_its_share_and_writes_nothing(tmp_path, square_loaders):
    cb = ExplainCallback(num_probe=3, on_error="raise")
    module = _module()
    trainer = _trainer(tmp_path, [cb], epochs=1)
    trainer.fit(module, *square_loaders)
    steps_before = len(_events(trainer.logger.log_dir).Images("explain/saliency/probe_00"))
    cb._writer = None  # what setup() gives a non-zero rank
    rank1 = Mock(global_step=7, global_rank=1, world_size=2, current_epoch=3)
    with patch.object(cb, "_run", wraps=cb._run) as run, patch.object(cb, "_write") as write:
        cb._scheduled(rank1, module, epoch=3)
    assert run.call_args[0][0] == [1]  # probes 0 and 2 are rank zero's
    write.assert_not_called()
    assert steps_before == 2 == len(_events(trainer.logger.log_dir).Images("explain/saliency/probe_00"))


def test_every_n_epochs_schedule(tmp_path, square_loaders):
    cb = ExplainCallback(num_probe=1, every_n_epochs=2, explain_at_start=False, on_error="raise")
    trainer = _trainer(tmp_path, [cb], epochs=3)
    trainer.fit(_module(), *square_loaders)
    assert [e.step for e in _events(trainer.logger.log_dir).Images("explain/layer_cam/probe_00")] == [4]


def test_other_loggers_alongside(tmp_path, square_loaders):
    cb = ExplainCallback(num_probe=1, on_error="raise")
    trainer = _trainer(tmp_path, [cb], epochs=1, logger=False)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_checkpointing=False,
        callbacks=[cb],
        accelerator="cpu",
        logger=[CSVLogger(str(tmp_path)), TensorBoardLogger(str(tmp_path), name="tb")],
    )
    trainer.fit(_module(), *square_loaders)
    assert len(_events(trainer.loggers[1].log_dir).Images("explain/saliency/probe_00")) == 2


def test_probe_with_no_ground_truth_tracks_top_detection(tmp_path):
    val = SquaresDataset(4, 3)
    for item in val.items:
        item["boxes"], item["labels"] = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    cb = ExplainCallback(num_probe=2, on_error="raise")
    module = _module()
    module.net.model[-1].cv3[0][-1].bias.data.fill_(5.0)  # every candidate is a confident detection
    trainer = _trainer(tmp_path, [cb], epochs=1)
    trainer.fit(
        module,
        DataLoader(SquaresDataset(8, 0), batch_size=8, collate_fn=collate),
        DataLoader(val, 4, collate_fn=collate),
    )
    assert all(len(t) == 1 and len(t[0]) == 5 for t in cb.state_dict()["tracked"])


def test_filmstrips_gifs_and_several_objects(tmp_path):
    from PIL import Image

    val = SquaresDataset(4, 3)
    for item in val.items:  # a second, smaller object in every validation image
        item["boxes"] = torch.cat([item["boxes"], torch.tensor([[2.0, 2.0, 12.0, 12.0]])])
        item["labels"] = torch.cat([item["labels"], torch.tensor([0])])
    cb = ExplainCallback(num_probe=2, max_objects=2, on_error="raise", normalize="fixed")
    trainer = _trainer(tmp_path, [cb], epochs=2)
    train = DataLoader(SquaresDataset(8, 0), batch_size=8, collate_fn=collate)
    with patch("xaiwatch.callbacks.explain.read_pictures", side_effect=AssertionError("read back")) as read:
        trainer.fit(_module(), train, DataLoader(val, 4, collate_fn=collate))
    assert not read.called  # a fresh fit drew every picture itself: nothing is read back from its log
    acc = _events(trainer.logger.log_dir)
    subjects = {"probe_00", "probe_00_obj1", "probe_01", "probe_01_obj1"}
    assert {t for t in acc.Tags()["images"] if t.startswith("explain/saliency/")} == {
        f"explain/saliency/{s}" for s in subjects
    }
    assert {t for t in acc.Tags()["images"] if t.startswith("explain_filmstrip/")} == {
        f"explain_filmstrip/{s}" for s in subjects
    }
    folder = Path(trainer.log_dir) / "xaiwatch"
    for subject in subjects:
        gif = Image.open(folder / f"{subject}.gif")
        assert gif.n_frames == 3  # steps 0, 1, 2
        strip = np.asarray(Image.open(folder / f"{subject}_filmstrip.png").convert("RGB"))
        assert strip.shape[1] > strip.shape[0]  # 3 epoch columns, 2 method rows
    tracked = cb.state_dict()["tracked"]
    assert [len(t) for t in tracked] == [2, 2]
    big, small = tracked[0]
    assert (big[2] - big[0]) * (big[3] - big[1]) > (small[2] - small[0]) * (small[3] - small[1])
    # normalize="fixed": one scale per method and object, from its first explained step (rank-local, so every
    # rank draws alike)
    assert set(cb.state_dict()["scales"]) == {f"{m}/{s}" for m in cb.methods for s in subjects}


def test_foundation_state_format_still_loads():
    cb = ExplainCallback()
    cb.load_state_dict({"probe_indices": [1, 2], "tracked": [[0, 0, 5, 5, 1], []], "last_step": 3})
    assert cb.state_dict()["tracked"] == [[[0, 0, 5, 5, 1]], []]
    with pytest.raises(ConfigurationError, match="method_options"):
        ExplainCallback(methods=["saliency"], method_options={"grad_cam": {}})


def test_every_kind_of_method_in_the_callback(tmp_path, square_loaders):
    cb = ExplainCallback(
        methods=["integrated_gradients", "feature_maps", "box_decision", "d_rise", "eigen_cam"],
        num_probe=2,
        on_error="raise",
        method_options={"integrated_gradients": {"n_steps": 4}, "d_rise": {"num_masks": 16, "conf": 0.0}},
    )
    trainer = _trainer(tmp_path, [cb], epochs=1)
    trainer.fit(_module(), *square_loaders)
    acc = _events(trainer.logger.log_dir)
    tags = {t for t in acc.Tags()["images"] if t.startswith("explain/")}
    assert tags == {f"explain/{m}/probe_{i:02d}" for m in cb.methods for i in range(2)}
    shapes = {}
    for m in cb.methods:
        e = acc.Images(f"explain/{m}/probe_00")[-1]
        shapes[m] = (e.height, e.width)
    assert shapes["feature_maps"] != shapes["integrated_gradients"]  # a channel grid, not an overlay
    assert shapes["box_decision"] != shapes["integrated_gradients"]  # the decision panel


def test_unsuitable_method_fails_at_setup(tmp_path, square_loaders):
    with pytest.raises(UnsupportedModelError, match="SiLU"):
        _trainer(tmp_path, [ExplainCallback(methods=["guided_backprop"])]).fit(_module(), *square_loaders)
