"""The template's schedule: by step and by epoch on Lightning's global-step axis, validate/test, fast_dev_run."""

from __future__ import annotations

import logging

import pytest

from helpers import make_trainer, read_events, tiny_module
from xaiwatch.callbacks import ErrorAnalysisCallback, ExplainCallback


def test_every_n_train_steps_on_the_global_step_axis(tmp_path, square_loaders):
    cb = ExplainCallback(
        methods=["saliency"], num_probe=1, every_n_epochs=None, every_n_train_steps=1, on_error="raise"
    )
    trainer = make_trainer(tmp_path, [cb], epochs=2)
    trainer.fit(tiny_module(), *square_loaders)
    acc = read_events(trainer.logger.log_dir)
    assert [e.step for e in acc.Images("explain/saliency/probe_00")] == [0, 1, 2, 3, 4]
    lightning = {e.step for e in acc.Scalars("val/map50")}
    assert lightning <= {e.step for e in acc.Images("explain/saliency/probe_00")}  # one x-axis with Lightning's


def test_step_and_epoch_schedules_do_not_run_twice_at_one_step(tmp_path, square_loaders):
    cb = ExplainCallback(methods=["saliency"], num_probe=1, every_n_train_steps=2, on_error="raise")
    trainer = make_trainer(tmp_path, [cb], epochs=2)
    trainer.fit(tiny_module(), *square_loaders)
    steps = [e.step for e in read_events(trainer.logger.log_dir).Images("explain/saliency/probe_00")]
    assert steps == [0, 2, 4]  # the epoch end at steps 2 and 4 coincides with the step schedule: once each


def test_validate_and_test_explain_at_the_loaded_models_step(tmp_path, square_loaders):
    cb = ExplainCallback(methods=["saliency"], num_probe=2, on_error="raise")
    trainer = make_trainer(tmp_path, [cb])
    module = tiny_module()
    module.test_step = module.validation_step  # YOLOv8Module validates; a user's module may also test
    trainer.validate(module, square_loaders[1])
    trainer.test(module, square_loaders[1])
    acc = read_events(trainer.logger.log_dir)
    assert [e.step for e in acc.Images("explain/saliency/probe_01")] == [0, 0]  # validate, then test


def test_outside_fit_can_be_turned_off_and_says_so(tmp_path, square_loaders, caplog):
    cb = ExplainCallback(methods=["saliency"], num_probe=2, outside_fit=False)
    trainer = make_trainer(tmp_path, [cb])
    with caplog.at_level(logging.INFO):
        trainer.validate(tiny_module(), square_loaders[1])
    assert "explain/saliency/probe_00" not in read_events(trainer.logger.log_dir).Tags()["images"]


def test_fast_dev_run_says_what_happened_instead_of_failing(tmp_path, square_loaders, caplog):
    cb = ExplainCallback(methods=["saliency"], num_probe=2, on_error="raise")
    trainer = make_trainer(tmp_path, [cb], fast_dev_run=True)
    with caplog.at_level(logging.INFO):
        trainer.fit(tiny_module(), *square_loaders)
    assert "fast_dev_run" in caplog.text and "nothing is explained" in caplog.text


def test_a_schedule_that_never_fires_warns_at_setup(tmp_path, square_loaders):
    cb = ErrorAnalysisCallback(every_n_epochs=5, max_images=4, explain_top_k=0)
    trainer = make_trainer(tmp_path, [cb], epochs=2)
    with pytest.warns(UserWarning, match="runs never"):
        trainer.fit(tiny_module(), *square_loaders)
