"""The command line: configs and overrides, fit/resume, validate/test/predict from checkpoints, errors."""

import importlib
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from jsonargparse import ArgumentError
from torch import nn

import fnlight as fl
from fnlight.checkpoint import CheckpointWarning
from fnlight.cli import CheckpointConfig, ConfigError, DataModule, EarlyStopConfig, FnlightCLI, Recipe, main, make_recipe_step
from fnlight.cli._saved_config import differences

ROOT = Path(__file__).resolve().parents[1]
HERE = __name__  # the module path class_path uses for the data modules below


class Blobs:
    """Three Gaussian blobs in 4-d: 4 training batches per epoch, and val/test/predict splits.

    Args:
        n: training samples.
        batch_size: training batch size.
        seed: draws the data and the shuffling order.
    """

    def __init__(self, n: int = 64, batch_size: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        centres = torch.randn(3, 4, generator=g) * 3

        def draw(m: int) -> tuple[torch.Tensor, torch.Tensor]:
            y = torch.randint(0, 3, (m,), generator=g)
            return centres[y] + torch.randn(m, 4, generator=g), y

        self.splits = {"train": draw(n), "val": draw(24), "test": draw(20)}
        self.batch_size, self.seed = batch_size, seed

    def train(self) -> fl.Loader:
        return fl.Loader(self.splits["train"], batch_size=self.batch_size, shuffle=True, seed=self.seed)

    def val(self) -> fl.Loader:
        return fl.Loader(self.splits["val"], batch_size=10)

    def test(self) -> fl.Loader:
        return fl.Loader(self.splits["test"], batch_size=8)

    def predict(self) -> fl.Loader:
        return fl.Loader((self.splits["test"][0],), batch_size=8)


class TrainOnly:
    """Only training data (no val, test or predict methods)."""

    def __init__(self, n: int = 32) -> None:
        self.data = Blobs(n).splits["train"]

    def train(self) -> fl.Loader:
        return fl.Loader(self.data, batch_size=16)


class Empty(Blobs):
    """val() and predict() return None, test() is an empty list."""

    def val(self) -> None:
        return None

    def test(self) -> list:
        return []

    def predict(self) -> None:
        return None


class NoBatches(Blobs):
    """predict() yields nothing."""

    def predict(self) -> list:
        return []


class Unsized(Blobs):
    """Training data as a function epoch -> batches (no len())."""

    def train(self):
        loader = super().train()
        return lambda epoch: loader.iter_epoch(epoch)


class TwoHeads(nn.Module):
    """Returns (logits, features): a tuple output.

    Args:
        classes: output classes.
    """

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(4, 8), nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.head(h), h


def two_heads_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    logits, _ = model(batch[0])
    return nn.functional.cross_entropy(logits, batch[1])


def write_config(path: Path, run_dir: Path, **recipe) -> Path:
    config = {
        "model": {"class_path": "torch.nn.Linear", "init_args": {"in_features": 4, "out_features": 3}},
        "data": {"class_path": f"{HERE}.Blobs", "init_args": {"n": 64, "batch_size": 16}},
        "recipe": {"run_dir": str(run_dir), "lr": 0.05, "epochs": 2, "tracker": "none", "progress": False} | recipe,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def cli(*args: str) -> FnlightCLI:
    return FnlightCLI(args=list(args), exit_on_error=False)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "run.yaml", tmp_path / "run")


def test_fit_from_config_writes_checkpoints_and_the_resolved_config(config, tmp_path, capsys):
    assert main(["fit", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "config.yaml",
        "latest",
        "step-000000004.ckpt",
        "step-000000008.ckpt",
    ]
    saved = yaml.safe_load((checkpoints / "config.yaml").read_text())
    assert saved["model"]["class_path"] == "torch.nn.Linear"
    assert saved["model"]["init_args"] == {"in_features": 4, "out_features": 3, "bias": True, "device": None, "dtype": None}
    assert saved["data"]["init_args"] == {"n": 64, "batch_size": 16, "seed": 0}
    assert saved["recipe"]["lr"] == 0.05 and saved["recipe"]["optimizer"] == "adamw" and saved["recipe"]["early_stop"] is None
    assert "fit: new run in" in out and "val/accuracy" in out
    assert yaml.safe_load(out.splitlines()[-1])["config"] == str(checkpoints / "config.yaml")
    assert set(saved) == {"model", "data", "recipe"}  # validate/test/predict accept it as --config


def test_command_line_overrides_the_config_file(config, tmp_path, capsys):
    args = ["fit", "--config", str(config), "--recipe.lr", "0.01", "--model.init_args.out_features", "5"]
    assert main([*args, "--recipe.checkpoint.keep_last", "4", "--recipe.early_stop.patience", "7", "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["recipe"]["lr"] == 0.01 and printed["recipe"]["epochs"] == 2  # the override, and the file's value
    assert printed["model"]["init_args"]["out_features"] == 5
    assert printed["recipe"]["checkpoint"]["keep_last"] == 4
    assert printed["recipe"]["early_stop"] == {
        "monitor": "val/loss",
        "mode": "min",
        "patience": 7,
        "min_delta": 0.0,
        "min_updates": 0,
        "restore_best": False,
    }
    assert printed["recipe"]["loss"] == "fnlight.losses.classification"  # defaults are filled in
    assert not (tmp_path / "run").exists()  # printing runs nothing


def test_configs_layer_in_order(config, tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text("recipe:\n  lr: 0.2\n  grad_accum: 2\n")
    run = FnlightCLI(args=["fit", "--config", str(config), "--config", str(override)], run=False)
    assert (run.recipe.lr, run.recipe.grad_accum, run.recipe.epochs) == (0.2, 2, 2)
    assert isinstance(run.model, nn.Linear) and isinstance(run.data, DataModule) and run.subcommand == "fit"


def test_fit_resumes_from_the_latest_checkpoint_exactly(tmp_path, capsys):
    first = write_config(tmp_path / "a.yaml", tmp_path / "a", epochs=1)
    assert int(cli("fit", "--config", str(first)).state.step) == 4
    again = cli("fit", "--config", str(first))  # the same config: resumes, nothing left to do
    assert int(again.state.step) == 4 and "resumed from" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"holds a different config \(recipe\.epochs: saved 1, given 3\); pass --overwrite"):
        cli("fit", "--config", str(first), "--recipe.epochs", "3")
    with pytest.raises(
        ConfigError, match=rf"model\.class_path: saved 'torch\.nn\.Linear', given '{re.escape(HERE)}\.TwoHeads'; .*given absent"
    ):
        cli("fit", "--config", str(first), "--model", f"{HERE}.TwoHeads")
    with pytest.raises(ConfigError, match=r"fit: the checkpoints in .* do not fit .*choose another --recipe\.run_dir"):
        cli("fit", "--config", str(first), "--model.init_args.out_features", "5", "--overwrite")
    saved = yaml.safe_load((tmp_path / "a" / "checkpoints" / "config.yaml").read_text())
    assert saved["model"]["init_args"]["out_features"] == 3  # a refused run changes nothing
    resumed = cli("fit", "--config", str(first), "--recipe.epochs", "3", "--overwrite")
    assert int(resumed.state.step) == 12
    assert resumed.state.slots["checkpointing"].resumed_from.endswith("step-000000004.ckpt")
    assert yaml.safe_load((tmp_path / "a" / "checkpoints" / "config.yaml").read_text())["recipe"]["epochs"] == 3

    straight = cli("fit", "--config", str(write_config(tmp_path / "b.yaml", tmp_path / "b", epochs=3)))
    assert fl.tree_equal(resumed.state.params, straight.state.params)  # 1 epoch + resume + 2 == 3 epochs, bit for bit
    assert fl.tree_equal(resumed.state.opt_state, straight.state.opt_state)


def test_a_resume_may_change_how_the_run_is_shown_and_logged(tmp_path, capsys):
    first = write_config(tmp_path / "a.yaml", tmp_path / "a", epochs=1)
    cli("fit", "--config", str(first))
    again = cli("fit", "--config", str(first), "--recipe.log_every", "7", "--recipe.progress", "null")
    assert int(again.state.step) == 4 and "resumed from" in capsys.readouterr().out  # no --overwrite for those two
    saved = yaml.safe_load((tmp_path / "a" / "checkpoints" / "config.yaml").read_text())["recipe"]
    assert (saved["log_every"], saved["progress"]) == (7, None)
    with pytest.raises(ConfigError, match=r"different config \(recipe\.epochs: saved 1, given 2\); pass --overwrite"):
        cli("fit", "--config", str(first), "--recipe.log_every", "3", "--recipe.epochs", "2")  # the rest still counts


def test_fit_without_resume_saves_its_own_final_state_over_another_runs_checkpoint(config, tmp_path, capsys):
    once = ["--recipe.checkpoint.every", "100"]  # no save during the fold: only fit's final one
    first = cli("fit", "--config", str(config), *once)
    again = ["--recipe.checkpoint.resume", "false", "--recipe.seed", "1", "--overwrite"]
    with pytest.warns(CheckpointWarning, match=r"resume=False\): .* holds 1 checkpoint\(s\) of an earlier run \(the newest"):
        second = cli("fit", "--config", str(config), *once, *again)  # starts over, to the same update
    assert int(second.state.step) == int(first.state.step) and second.checkpoint == first.checkpoint
    saved = fl.checkpoint.restore(second.checkpoint, second.state)  # the checkpoint fit reports holds the state it trained
    assert all(torch.equal(a, b) for a, b in zip(saved.params.values(), second.state.params.values(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(saved.params.values(), first.state.params.values(), strict=True))
    validate = cli("validate", "--config", str(tmp_path / "run" / "checkpoints" / "config.yaml"))  # restores, no warning
    assert validate.metrics == cli("validate", "--config", str(config), "--recipe.seed", "1", *once).metrics


def test_fit_starts_over_when_every_checkpoint_is_damaged(config, tmp_path):
    cli("fit", "--config", str(config))
    damaged = len(list((tmp_path / "run" / "checkpoints").glob("step-*.ckpt")))
    for path in (tmp_path / "run" / "checkpoints").glob("step-*.ckpt"):
        with open(path, "r+b") as f:  # flip a bit of the first tensor: the index is intact, the CRC is not
            f.seek(64)
            byte = f.read(1)
            f.seek(64)
            f.write(bytes([byte[0] ^ 1]))
    with pytest.warns(CheckpointWarning, match=r"skipped the damaged checkpoint .*step-00000000[48]\.ckpt") as caught:
        again = cli("fit", "--config", str(config))
    assert int(again.state.step) == 8 and again.state.slots["checkpointing"].resumed_from == ""
    assert len(caught) == damaged  # one warning per file skipped


def test_a_saved_config_that_cannot_be_read_is_named(config, tmp_path, capsys):
    saved = tmp_path / "run" / "checkpoints" / "config.yaml"
    saved.parent.mkdir(parents=True)
    saved.write_text("model: [\n")  # edited by hand into YAML that does not parse
    match = r"(?s)fit: .*config\.yaml \(the run's saved config\) cannot be read: (ParserError|ScannerError): .*pass --overwrite"
    with pytest.raises(ConfigError, match=match):
        cli("fit", "--config", str(config))
    assert main(["fit", "--config", str(config)]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert cli("fit", "--config", str(config), "--overwrite").state.step == 8  # --overwrite replaces it
    assert yaml.safe_load(saved.read_text())["recipe"]["epochs"] == 2


def test_config_differences_are_listed_by_dotted_key():
    saved = {"model": {"class_path": "A", "init_args": {"width": 8}}, "recipe": {f"k{i}": i for i in range(7)} | {"g": {}}}
    given = {"model": {"class_path": "B"}, "recipe": {f"k{i}": -i for i in range(7)} | {"g": {"x": 1}}}
    assert differences(saved, given, limit=3) == (
        "model.class_path: saved 'A', given 'B'; model.init_args.width: saved 8, given absent; "
        "recipe.k1: saved 1, given -1; and 7 more"
    )
    assert differences(saved, saved) == ""


def test_validate_and_test_report_the_metrics_of_a_checkpoint(config, tmp_path, capsys):
    fit = cli("fit", "--config", str(config))
    saved = str(tmp_path / "run" / "checkpoints" / "config.yaml")
    capsys.readouterr()
    validate = cli("validate", "--config", saved)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["step"] == 8 and printed["checkpoint"].endswith("step-000000008.ckpt")
    assert printed["val/loss"] == validate.metrics["val/loss"] == pytest.approx(fit.metrics["val/loss"], abs=0)
    expected = fl.evaluate(fl.make_eval_step(fl.losses.classification), fit.state, Blobs().val())
    assert validate.metrics == {"val/" + k: v for k, v in expected.items()}

    test = cli("test", "--config", saved, "--ckpt_path", str(tmp_path / "run" / "checkpoints" / "step-000000004.ckpt"))
    assert sorted(test.metrics) == ["test/accuracy", "test/loss"] and int(test.state.step) == 4


def test_ckpt_path_best_ranks_by_the_monitored_metric(tmp_path):
    config = write_config(tmp_path / "run.yaml", tmp_path / "run", epochs=3, checkpoint={"keep_last": 3, "monitor": "val/loss"})
    fit = cli("fit", "--config", str(config), "--recipe.lr", "0.5")
    recorded = {}
    for path in (tmp_path / "run" / "checkpoints").glob("step-*.ckpt"):
        metadata = fl.checkpoint.read_metadata(path)["metadata"]
        recorded[path] = metadata["value"]
    assert len(recorded) == 3 and fit.metrics["val/loss"] in recorded.values()
    best = cli("validate", "--config", str(config), "--recipe.lr", "0.5", "--ckpt_path", "best")
    assert best.checkpoint == min(recorded, key=recorded.get)
    assert best.metrics["val/loss"] == recorded[best.checkpoint]  # recorded at save time, on the same state


def test_predict_writes_one_output_row_per_input(config, tmp_path):
    fit = cli("fit", "--config", str(config))
    predicted = cli("predict", "--config", str(config))
    assert predicted.output == tmp_path / "run" / "predictions.pt"
    outputs = torch.load(predicted.output)
    x = Blobs().splits["test"][0]
    assert outputs.shape == (20, 3)
    torch.testing.assert_close(outputs, fl.to_module(fit.state)(x), rtol=0, atol=0)
    cli("predict", "--config", str(config), "--output", str(tmp_path / "out" / "logits.npy"))
    assert np.array_equal(np.load(tmp_path / "out" / "logits.npy"), outputs.numpy())


def test_predict_keeps_the_structure_of_tuple_outputs(tmp_path):
    config = write_config(tmp_path / "run.yaml", tmp_path / "run", epochs=1)
    args = ["--config", str(config), "--model", f"{HERE}.TwoHeads", "--recipe.loss", f"{HERE}.two_heads_loss"]
    cli("fit", *args)
    predicted = cli("predict", *args)
    logits, features = predicted.predictions
    assert logits.shape == (20, 3) and features.shape == (20, 8)
    with pytest.raises(ConfigError, match=r"\(\.npy\) holds one array, but the model returns tuple; use a \.pt file"):
        cli("predict", *args, "--output", str(tmp_path / "p.npy"))


def test_the_fnlight_command_runs_the_example_config(tmp_path):
    """`python -m fnlight.cli` (what the `fnlight` script calls) on examples/configs/digits.yaml, as its docstring says."""
    run_dir = tmp_path / "digits"
    overrides = [
        "--recipe.run_dir",
        str(run_dir),
        "--recipe.epochs",
        "1",
        "--recipe.warmup_steps",
        "4",
        "--recipe.tracker",
        "jsonl",
    ]
    overrides += ["--model.init_args.hidden", "32"]
    command = [sys.executable, "-m", "fnlight.cli", "fit", "--config", "examples/configs/digits.yaml", *overrides]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "checkpoints" / "step-000000020.ckpt").exists()  # 1257 samples / 64 = 20 updates per epoch
    assert len(list(run_dir.glob("*.jsonl"))) == 1 and len(list(run_dir.glob("*.hparams.json"))) == 1
    hparams = json.loads(next(run_dir.glob("*.hparams.json")).read_text())
    assert hparams["model"]["init_args"]["hidden"] == 32  # the trackers record the resolved config


def test_the_console_script_is_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["fnlight"].partition(":")
    assert getattr(importlib.import_module(module), name) is main
    assert importlib.import_module("fnlight.cli.__main__").main is main


# --- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--recipe.lrr", "1"], r"recipe\.lrr"),  # unknown key
        (["--recipe.epochs", "two"], r"recipe\.epochs"),  # wrong type
        (["--recipe.optimizer", "lion"], r"(?s)recipe\.optimizer.*lion"),
        (["--model.init_args.out_feature", "3"], r"out_feature"),
        (["--model", "torch.nn.Linear", "--model.init_args.in_features", "null"], r"in_features"),
        (["--data", "builtins.dict"], r"does not implement protocol DataModule"),
    ],
)
def test_command_line_errors_name_the_key(config, extra, match, capsys):
    with pytest.raises(ArgumentError, match=match):
        cli("fit", "--config", str(config), *extra)
    assert main(["fit", "--config", str(config), *extra]) == 2
    assert "error:" in capsys.readouterr().err


def test_config_file_errors_name_the_key(tmp_path, capsys):
    unknown = tmp_path / "unknown.yaml"
    write_config(unknown, tmp_path / "run", lrr=0.1)
    with pytest.raises(ArgumentError, match=r"recipe\.lrr"):
        cli("fit", "--config", str(unknown))
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({"data": {"class_path": f"{HERE}.Blobs"}}))
    with pytest.raises(ArgumentError, match=r"model"):
        cli("fit", "--config", str(missing))
    no_init = tmp_path / "required.yaml"
    no_init.write_text(yaml.safe_dump({"model": {"class_path": "torch.nn.Linear"}, "data": {"class_path": f"{HERE}.Blobs"}}))
    with pytest.raises(ArgumentError, match=r"in_features"):
        cli("fit", "--config", str(no_init))
    with pytest.raises(ArgumentError, match=r"does not exist"):
        cli("fit", "--config", str(tmp_path / "nowhere.yaml"))
    with pytest.raises(ArgumentError, match=r"subcommand"):
        cli()
    assert main(["fit", "--config", str(unknown)]) == 2
    assert "recipe.lrr" in capsys.readouterr().err


def test_config_errors_reach_the_user_with_status_2(config, tmp_path, capsys):
    assert main(["validate", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fnlight: error: validate: no checkpoint (step-*.ckpt) in") and "Traceback" not in err
    assert main(["fit", "--config", str(config), "--recipe.grad_accum", "0"]) == 2
    assert "recipe.grad_accum must be an int >= 1, got 0" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["fit", "--config", str(config), "--recipe.run_dir", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert f"fit: recipe.run_dir {str(blocker)!r} cannot hold the run's files" in err and "Traceback" not in err
    assert main(["fit", "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["predict", "--config", str(config), "--output", str(blocker / "p.pt")]) == 2
    assert f"predict: --output {str(blocker / 'p.pt')!r} cannot be written" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        ("--recipe.checkpoint.seconds", "1e400", r"hparams\['recipe'\].*\['seconds'\] is inf: hyperparameters must be finite"),
        ("--recipe.log_every", str(2**70), r"hparams\['recipe'\]\['log_every'\] is 1180591620717411303424, outside int64"),
    ],
)
def test_a_config_the_trackers_cannot_record_is_a_config_error(config, option, value, match, capsys):
    args = ["fit", "--config", str(config), "--recipe.tracker", "jsonl", option, value]
    where = r"recipe\.tracker \(the config is recorded as hyperparameters\): with_tracking: "
    with pytest.raises(ConfigError, match=where + match):
        cli(*args)
    assert main(args) == 2
    assert "Traceback" not in capsys.readouterr().err


class Picky(Blobs):
    """Refuses an odd batch size in its __init__."""

    def __init__(self, n: int = 64, batch_size: int = 16, seed: int = 0) -> None:
        if batch_size % 2:
            raise ValueError(f"Picky: batch_size must be even, got {batch_size}")
        super().__init__(n, batch_size, seed)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (
            ["--model.init_args.in_features", "-1"],
            r"fit: model \(torch\.nn\.modules\.linear\.Linear\) could not be built from the config: "
            r"RuntimeError: Trying to create tensor with negative dimension -1",
        ),
        (
            ["--data", f"{HERE}.Picky", "--data.init_args.batch_size", "7"],
            rf"fit: data \({HERE}\.Picky\) could not be built from the config: ValueError: Picky: batch_size must be even, got 7",
        ),
    ],
)
def test_a_model_or_data_module_that_refuses_its_arguments_is_a_config_error(config, extra, match, capsys):
    with pytest.raises(ConfigError, match=match):
        cli("fit", "--config", str(config), *extra)
    assert main(["fit", "--config", str(config), *extra]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_fixed_classes_that_refuse_their_arguments_are_named(tmp_path):
    args = ["fit", "--model.in_features", "4", "--model.out_features", "3", "--data.batch_size", "3"]
    quiet = ["--recipe.run_dir", str(tmp_path), "--recipe.tracker", "none"]
    with pytest.raises(ConfigError, match=rf"fit: data \({HERE}\.Picky\) could not be built .*got 3"):
        FnlightCLI(nn.Linear, Picky, args=[*args, *quiet])


class BF16Out(nn.Linear):
    """Predicts in bfloat16, a dtype numpy has not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out.to(torch.bfloat16) if torch.is_inference_mode_enabled() else out


def test_predict_names_an_output_dtype_npy_cannot_hold(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tmp_path / "run", epochs=1)
    model = ["--model", f"{HERE}.BF16Out", "--model.init_args.in_features", "4", "--model.init_args.out_features", "3"]
    cli("fit", "--config", str(config), *model)
    npy = str(tmp_path / "p.npy")
    with pytest.raises(ConfigError, match=r"--output '.*p\.npy' \(\.npy\) cannot hold the model's torch\.bfloat16 output"):
        cli("predict", "--config", str(config), *model, "--output", npy)
    assert main(["predict", "--config", str(config), *model, "--output", npy]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "run"]  # no file, no temporary file
    assert cli("predict", "--config", str(config), *model, "--output", str(tmp_path / "p.pt")).predictions.dtype == torch.bfloat16


def test_predict_to_an_output_that_cannot_be_written_is_a_config_error(config, tmp_path, capsys):
    cli("fit", "--config", str(config))
    taken = tmp_path / "taken.pt"
    taken.mkdir()  # a directory where the file should go: the directory exists, the write fails
    with pytest.raises(ConfigError, match=r"predict: --output '.*taken\.pt' cannot be written: \[Errno 21\] Is a directory"):
        cli("predict", "--config", str(config), "--output", str(taken))
    assert main(["predict", "--config", str(config), "--output", str(taken)]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run.yaml", "taken.pt"]  # no temporary file left


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"seed": -1}, r"recipe\.seed must be an int >= 0, got -1"),
        ({"seed": 2**63}, r"recipe\.seed must be an int in \[0, 2\*\*63\) \(the state's int64 key\), got 9223372036854775808"),
        ({"run_dir": ""}, r"recipe\.run_dir must be a non-empty path, got ''"),
        ({"loss": 3}, r"recipe\.loss must be a function loss_fn\(model, batch\), got 3"),
        ({"optimizer": "lion"}, r"recipe\.optimizer must be one of \['adamw', 'adam', 'sgd', 'rmsprop', 'adagrad'\], got 'lion'"),
        ({"amp": "fp8"}, r"recipe\.amp must be one of \['none', 'bf16', 'fp16'\], got 'fp8'"),
        (
            {"momentum": 0.9},
            r"recipe\.momentum applies to the optimizers \['sgd', 'rmsprop'\], got momentum=0\.9 with optimizer='adamw'",
        ),
        ({"warmup_steps": -1}, r"recipe\.warmup_steps must be an int >= 0, got -1"),
        (
            {"end_lr": 0.1},
            r"recipe\.end_lr applies to the schedules 'cosine' and 'linear', got end_lr=0\.1 with schedule='constant'",
        ),
        ({"epochs": 0}, r"recipe\.epochs must be an int >= 1 or null, got 0"),
        ({"max_steps": True}, r"recipe\.max_steps must be an int >= 1 or null, got True"),
        ({"epochs": None}, r"recipe: give epochs and/or max_steps, got both null"),
        ({"grad_accum": 0}, r"recipe\.grad_accum must be an int >= 1, got 0"),
        ({"eval_every": "sometimes"}, r"recipe\.eval_every must be an int >= 1, 'epoch' or 'never', got 'sometimes'"),
        ({"log_every": 0}, r"recipe\.log_every must be an int >= 1, got 0"),
    ],
)
def test_recipe_values_are_checked(options, match):
    with pytest.raises(ConfigError, match=match):
        Recipe(**options)


def test_recipe_sections_must_be_their_classes():
    with pytest.raises(ConfigError, match=r"recipe\.checkpoint must be a CheckpointConfig, got dict: \{'every': 5\}"):
        Recipe(checkpoint={"every": 5})
    with pytest.raises(ConfigError, match=r"recipe\.early_stop must be an EarlyStopConfig or None, got dict"):
        Recipe(early_stop={"patience": 2})


@pytest.mark.parametrize(
    ("options", "data", "match"),
    [
        (
            {"lr": -1.0},
            Blobs,
            r"recipe \(optimizer, lr, .*\): fnlight\.optim\.adamw: learning_rate must be in \[0\.0, inf\), got -1\.0",
        ),
        (
            {"lr": -1.0, "schedule": "cosine"},
            Blobs,
            r"recipe\.lr must be a finite number >= 0 \(a learning rate of schedule='cosine'\), got -1\.0",
        ),
        ({"lr": -1.0, "warmup_steps": 2}, Blobs, r"recipe\.lr must be a finite number >= 0 .*'constant'\), got -1\.0"),
        ({"end_lr": -5.0, "schedule": "linear"}, Blobs, r"recipe\.end_lr must be a finite number >= 0 .*'linear'\), got -5\.0"),
        ({"lr": float("inf"), "schedule": "linear"}, Blobs, r"recipe\.lr must be a finite number >= 0 .*, got inf"),
        ({"clip_norm": 0.0}, Blobs, r"recipe \(.*clip_norm\): fnlight\.optim\.clip_by_global_norm: max_norm"),
        (
            {"schedule": "cosine"},
            Unsized,
            r"recipe\.schedule='cosine' needs the run's length in optimizer updates.*set recipe\.max_steps",
        ),
        ({"schedule": "linear", "warmup_steps": 4}, Blobs, r"recipe\.warmup_steps must be below the run's 4 optimizer updates"),
        ({"early_stop": EarlyStopConfig()}, TrainOnly, r"recipe\.early_stop\.monitor='val/loss' is a validation metric"),
        ({"early_stop": EarlyStopConfig(), "eval_every": "never"}, Blobs, r"recipe\.eval_every is 'never'"),
        (
            {"early_stop": EarlyStopConfig(patience=0)},
            Blobs,
            r"recipe\.early_stop: with_early_stop: patience must be an int >= 1",
        ),
        ({}, Unsized, r"recipe\.checkpoint\.every='epoch' needs len\(\) of the training data"),
        ({"checkpoint": CheckpointConfig(every=None)}, Blobs, r"recipe\.checkpoint: with_checkpointing: give every=N"),
        (
            {"checkpoint": CheckpointConfig(keep_best=1)},
            Blobs,
            r"recipe\.checkpoint: with_checkpointing: keep_best=1 needs monitor",
        ),
        ({}, Empty, r"data\.val\(\) and recipe\.eval_every: with_eval"),
    ],
)
def test_recipe_is_checked_against_the_functions_and_the_data(tmp_path, options, data, match):
    recipe = Recipe(run_dir=str(tmp_path), tracker="none", **options)
    module = data()
    val = [] if data is Empty else getattr(module, "val", lambda: None)()
    with pytest.raises(ConfigError, match=match):
        make_recipe_step(nn.Linear(4, 3), recipe, train=module.train(), val=val)


def test_make_recipe_step_assembles_the_canonical_order(tmp_path):
    recipe = Recipe(
        run_dir=str(tmp_path),
        amp="bf16",
        grad_accum=2,
        early_stop=EarlyStopConfig(monitor="loss"),
        tracker="jsonl",
        clip_norm=1.0,
    )
    data = Blobs()
    step = make_recipe_step(nn.Linear(4, 3), recipe, train=data.train(), val=data.val())
    names, layer = [], step
    while isinstance(layer, fl.Transform):
        names.append(layer.name)
        layer = layer.inner
    assert names == ["with_checkpointing", "with_tracking", "with_early_stop", "with_eval", "with_grad_accum", "with_amp"]
    assert step.every == 2 and step.inner.inner.inner.every == 2  # 4 batches / 2 per update: 'epoch' is 2 updates
    with pytest.raises(ValueError, match=r"make_recipe_step: the training data must not be empty, got list of length 0"):
        make_recipe_step(nn.Linear(4, 3), recipe, train=[])
    with pytest.raises(TypeError, match=r"make_recipe_step: model must be a torch\.nn\.Module, got str"):
        make_recipe_step("model", recipe, train=data.train())
    with pytest.raises(TypeError, match=r"make_recipe_step: recipe must be a fnlight\.cli\.Recipe, got dict"):
        make_recipe_step(nn.Linear(4, 3), {"lr": 0.1}, train=data.train())


def test_subcommands_refuse_what_they_cannot_run(config, tmp_path):
    def run(sub: str, *args: str, data: str = "Blobs") -> FnlightCLI:
        return cli(sub, "--config", str(config), "--data", f"{HERE}.{data}", *args)

    with pytest.raises(ConfigError, match=r"validate: no checkpoint \(step-\*\.ckpt\) in .*run fit with this config first"):
        run("validate")
    run("fit")
    with pytest.raises(ConfigError, match=r"test: the data module TrainOnly has no test\(\) method, which test runs on"):
        run("test", data="TrainOnly")
    with pytest.raises(ConfigError, match=r"validate: Empty\.val\(\) returned None: there is no data to evaluate on"):
        run("validate", data="Empty")
    with pytest.raises(ConfigError, match=r"test: data\.test\(\): with_eval: .*empty"):
        run("test", data="Empty")
    with pytest.raises(ConfigError, match=r"predict: Empty\.predict\(\) returned None: there is nothing to predict"):
        run("predict", data="Empty")
    with pytest.raises(ConfigError, match=r"predict: NoBatches\.predict\(\) gave no batches"):
        run("predict", data="NoBatches")
    with pytest.raises(ConfigError, match=r"predict: --output must end in one of \['\.pt', '\.pth', '\.npy'\], got '.*out\.csv'"):
        run("predict", "--output", str(tmp_path / "out.csv"))
    with pytest.raises(
        ConfigError, match=r"test: --ckpt_path 'nope\.ckpt': no such file \(expected latest, best, or a checkpoint file\)"
    ):
        run("test", "--ckpt_path", "nope.ckpt")
    with pytest.raises(
        ConfigError, match=r"validate: --ckpt_path best ranks checkpoints by recipe\.checkpoint\.monitor, which is null"
    ):
        run("validate", "--ckpt_path", "best")
    with pytest.raises(ConfigError, match=r"--ckpt_path best: no checkpoint in .* records a value of 'val/accuracy'"):
        run("validate", "--ckpt_path", "best", "--recipe.checkpoint.monitor", "val/accuracy")
    with pytest.raises(ConfigError, match=r"validate: the checkpoint does not fit this config's model.*--config .*config\.yaml"):
        run("validate", "--model.init_args.out_features", "5")
    with pytest.raises(ConfigError, match=r"validate: the checkpoint '.*run\.yaml' cannot be read: .*not an fnlight checkpoint"):
        run("validate", "--ckpt_path", str(config))


class WithCount(TwoHeads):
    """Trains on logits; predicts {"logits": ..., "n": 3}, an output that is not a tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict:
        logits = super().forward(x)[0]
        return {"logits": logits, "n": 3} if torch.is_inference_mode_enabled() else logits


def test_predict_refuses_an_output_that_is_not_a_batch_of_tensors(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tmp_path / "run", epochs=1)
    model = ["--model", f"{HERE}.WithCount"]
    cli("fit", "--config", str(config), *model)
    with pytest.raises(ConfigError, match=r"predict: the model's output\['n'\] is int: 3; .*a tensor with a batch dimension"):
        cli("predict", "--config", str(config), *model)
    assert main(["predict", "--config", str(config), *model]) == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("recipe", "extra", "match"),
    [
        (5, [], r"fit: recipe in .*\.yaml must be a mapping of Recipe fields, got int: 5"),
        ([1, 2], [], r"fit: recipe in .*\.yaml must be a mapping of Recipe fields, got list: \[1, 2\]"),
        (5, ["--recipe.seed", "3"], r"fit: recipe in .*\.yaml must be a mapping"),  # was replaced by the defaults
        ({"checkpoint": 7}, [], r"fit: recipe\.checkpoint in .*\.yaml must be a mapping of CheckpointConfig fields, got int: 7"),
        (  # a null checkpoint section was refused alone, but replaced by the defaults under an override of one of its keys
            {"checkpoint": None},
            ["--recipe.checkpoint.keep_last", "3"],
            r"fit: recipe\.checkpoint in .*\.yaml must be a mapping of CheckpointConfig fields, got NoneType: None",
        ),
    ],
)
def test_a_recipe_section_that_is_not_a_mapping_is_refused(tmp_path, recipe, extra, match, capsys):
    path = tmp_path / "bad.yaml"
    config = yaml.safe_load(write_config(path, tmp_path / "run").read_text())
    path.write_text(yaml.safe_dump(config | {"recipe": recipe}))
    with pytest.raises(ConfigError, match=match):
        cli("fit", "--config", str(path), *extra)
    assert main(["fit", "--config", str(path), *extra]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_epoch_printed_at_a_folds_end_is_the_one_just_trained(config, capsys):
    unsized = ["--data", f"{HERE}.Unsized", "--recipe.checkpoint.every", "4"]
    cli("fit", "--config", str(config), *unsized, "--recipe.log_every", "100")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert lines and all(line.startswith("epoch    2  update       8") for line in lines), lines  # 2 epochs of 4


def test_constructor_arguments_are_checked():
    with pytest.raises(
        TypeError, match=r"FnlightCLI: model_class must be a torch\.nn\.Module subclass or None, got <class 'str'>"
    ):
        FnlightCLI(str, args=[])
    with pytest.raises(TypeError, match=r"FnlightCLI: data_class must be a class with a train\(\) method .* got <class 'int'>"):
        FnlightCLI(None, int, args=[])


def test_classes_given_to_the_cli_take_their_arguments_directly(tmp_path):
    base = ["--recipe.run_dir", str(tmp_path), "--recipe.tracker", "none", "--recipe.progress", "false", "--recipe.epochs", "1"]
    base += ["--recipe.loss", f"{HERE}.two_heads_loss"]
    run = FnlightCLI(TwoHeads, Blobs, args=["fit", "--model.classes", "3", "--data.n", "32", *base], exit_on_error=False)
    assert int(run.state.step) == 2 and isinstance(run.model, TwoHeads)
    with pytest.raises(ArgumentError, match=r"model\.init_args"):  # no class_path/init_args without subclass mode
        FnlightCLI(TwoHeads, Blobs, args=["fit", "--model.init_args.classes", "3", *base], exit_on_error=False)
    base[1] = str(tmp_path / "sub")
    sub = FnlightCLI(nn.Module, Blobs, args=["fit", "--model", f"{HERE}.TwoHeads", *base], subclass_mode_model=True, run=False)
    assert isinstance(sub.model, TwoHeads) and sub.state is None


def test_a_missing_jsonargparse_is_named_with_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "jsonargparse", None)
    monkeypatch.delitem(sys.modules, "fnlight.cli._cli")
    with pytest.raises(ImportError, match=r"fnlight\.cli needs jsonargparse: pip install 'fnlight\[cli\]'"):
        importlib.import_module("fnlight.cli._cli")


def test_an_inline_config_is_checked_as_well(tmp_path):
    config = yaml.safe_load(write_config(tmp_path / "c.yaml", tmp_path / "run", epochs=1).read_text())
    inline = json.dumps(config)  # YAML text given to --config instead of a file
    assert FnlightCLI(args=["fit", "--config", inline], exit_on_error=False, run=False).config.recipe.epochs == 1
    config["recipe"]["checkpoint"] = 7
    with pytest.raises(ConfigError, match=r"fit: recipe\.checkpoint must be a mapping of CheckpointConfig fields, got int: 7"):
        cli("fit", "--config", json.dumps(config))


def test_a_recipe_file_is_checked_as_well(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tmp_path / "run", epochs=1)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("epochs: 1\nearly_stop: null\n")  # null: no early stopping
    assert FnlightCLI(args=["fit", "--config", str(config), "--recipe", str(recipe)], run=False).recipe.early_stop is None
    recipe.write_text("checkpoint: 7\n")  # the file is the recipe section; its checkpoint was replaced by the defaults
    match = r"fit: recipe\.checkpoint in .*recipe\.yaml must be a mapping of CheckpointConfig fields, got int: 7"
    with pytest.raises(ConfigError, match=match):
        cli("fit", "--config", str(config), "--recipe", str(recipe), "--recipe.checkpoint.keep_last", "3")
    assert main(["fit", "--config", str(config), "--recipe", str(recipe), "--recipe.checkpoint.keep_last", "3"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
