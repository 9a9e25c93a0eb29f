"""tracking.py: which trackers a run reports to, and what a TensorBoard run holds (offline)."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from config import ConfigError
import main
from test_main import cli_args, only_run_dir
from slm_ensembles import tracking


def test_report_to_names_trackers_and_refuses_unknown_ones():
    assert tracking.tracker_names("none") == [] and tracking.tracker_names("") == []
    assert tracking.tracker_names("tensorboard, wandb") == ["tensorboard", "wandb"]
    assert tracking.trainer_report_to("tensorboard,wandb") == ["wandb"]  # TensorBoard: our own callback
    with pytest.raises(ConfigError, match=r"unknown tracker\(s\) \['tensorbored'\]: it takes none or any of"):
        tracking.tracker_names("tensorbored")


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_tensorboard_run_holds_every_rounds_metrics_and_the_early_stopping_curve(tiny_teacher_dir, tmp_path):
    assert main.main(cli_args(tiny_teacher_dir, tmp_path, "--report_to", "tensorboard", "--eval_steps", "2")) == 0
    run_dir = only_run_dir(tmp_path)
    metrics = main.pd.read_csv(run_dir / "metrics.csv").set_index(["round", "model"])
    rounds = scalars(run_dir / "tensorboard" / "rounds")
    for round_index in (0, 1):
        for model in ("student", "ensemble"):
            logged = dict(rounds[f"{model}/ce"])[round_index]
            assert logged == pytest.approx(metrics.loc[(round_index, model), "ce"], rel=1e-6)
    assert [step for step, _ in rounds["teacher/ce"]] == [0]
    log = main.pd.read_csv(run_dir / "train_log.csv")
    for round_index in (0, 1):
        training = scalars(run_dir / "tensorboard" / f"round_{round_index}")
        expected = log[(log["round"] == round_index) & log["heldout_ce"].notna()]
        steps, values = zip(*training["train/heldout_ce"])
        assert list(steps) == list(expected["step"]) == [2, 3]  # every eval_steps, and at the last step
        assert list(values) == pytest.approx(list(expected["heldout_ce"]), rel=1e-6)
        assert [step for step, _ in training["train/hybrid"]] == [1, 2, 3]


def test_an_unknown_tracker_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(ConfigError, match="report_to"):
        main.main(["--preset", "test", "--report_to", "nothing", "--output_root", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists()
