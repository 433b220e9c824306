"""Export: ONNX (checked against onnxruntime), torch.export archives and TorchScript, against the eager model."""

import os
import sys
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import fnlight as fl
import fnlight.export as fx
from fnlight.optim import adamw
from tests.conftest import make_batches, make_bn_mlp

EXAMPLE = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
FORMATS = ("onnx", "pt2", "trace", "script")
EXPORTERS = (fx.to_onnx, fx.to_pt2, fx.to_torchscript)
TOLERANCE = {"onnx": 1e-5, "pt2": 1e-6, "trace": 1e-6, "script": 1e-6}


def _jit_load(path: os.PathLike) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=DeprecationWarning)
        return torch.jit.load(path)


def _ort_session(path: os.PathLike):
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])


def _load(fmt: str, path: os.PathLike) -> Callable[..., Tensor]:
    """The exported file as a function of tensors, run by the runtime that reads the format."""
    if fmt == "onnx":
        session = _ort_session(path)
        names = [i.name for i in session.get_inputs()]
        return lambda *xs: torch.from_numpy(session.run(None, dict(zip(names, (x.numpy() for x in xs))))[0])
    module = torch.export.load(path).module() if fmt == "pt2" else _jit_load(path)

    def run(*xs: Tensor) -> Tensor:
        with torch.no_grad():
            return module(*xs)

    return run


class TwoInOut(nn.Module):
    """Two inputs, two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, a: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        return self.linear(a) + c, a.sum(-1)


class FixedBatch(nn.Module):
    """Reshapes to a batch of 4: its batch dimension cannot be dynamic."""

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(4, -1) * 2


@pytest.fixture(scope="module")
def trained() -> fl.TrainState:
    """A BatchNorm + dropout MLP trained a few updates: running statistics moved, dropout active in training."""
    step = fl.make_train_step(make_bn_mlp(dropout=0.3), fl.losses.cross_entropy, adamw(1e-2))
    state = fl.fold(step, step.init(seed=0), make_batches(4), progress=False)
    assert int(state.step) == 4 and float(state.buffers["1.running_mean"].abs().sum()) > 0
    return state


@pytest.fixture(scope="module")
def reference(trained) -> nn.Module:
    """The hand-written eager model: a fresh module with the trained weights, in eval mode."""
    module = make_bn_mlp(seed=7, dropout=0.3)
    module.load_state_dict(fl.state_dict(trained))
    return module.eval()


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> dict[str, os.PathLike]:
    directory = tmp_path_factory.mktemp("exported")
    paths = {
        "onnx": fx.to_onnx(trained, EXAMPLE, directory / "model.onnx", input_names=["x"], output_names=["logits"]),
        "pt2": fx.to_pt2(trained, EXAMPLE, directory / "model.pt2"),
        "trace": fx.to_torchscript(trained, EXAMPLE, directory / "traced.pt"),
        "script": fx.to_torchscript(trained, EXAMPLE, directory / "scripted.pt", method="script"),
    }
    assert sorted(os.listdir(directory)) == ["model.onnx", "model.pt2", "scripted.pt", "traced.pt"]  # no temporaries
    return paths


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_model_matches_eager_on_other_batch_sizes(fmt, exported, reference):
    run = _load(fmt, exported[fmt])
    for batch in (1, 3, 17):
        x = torch.randn(batch, 10, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = reference(x)
        torch.testing.assert_close(run(x), expected, rtol=0, atol=TOLERANCE[fmt])


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_in_eval_mode(fmt, exported, reference):
    run = _load(fmt, exported[fmt])
    x = torch.randn(17, 10, generator=torch.Generator().manual_seed(3))
    reference.train()  # batch statistics and dropout: what the file must not do
    try:
        with torch.no_grad():
            in_training = reference(x)
    finally:
        reference.eval()
    assert torch.equal(run(x), run(x))  # no dropout
    assert not torch.allclose(run(x), in_training, atol=1e-2)


def test_onnx_file_names_the_batch_axis_and_is_self_contained(exported):
    session = _ort_session(exported["onnx"])
    [x], [logits] = session.get_inputs(), session.get_outputs()
    assert (x.name, x.shape, logits.name, logits.shape) == ("x", ["batch", 10], "logits", ["batch", 3])
    onnx = pytest.importorskip("onnx")
    model = onnx.load(os.fspath(exported["onnx"]), load_external_data=False)
    assert not [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]


def test_pt2_reloads_with_a_dynamic_batch(exported):
    program = torch.export.load(exported["pt2"])
    assert len(program.range_constraints) == 1  # one symbol: the batch
    assert isinstance(program.module()(torch.randn(9, 10)), Tensor)


def test_onnx_with_several_inputs_and_outputs(tmp_path):
    model = TwoInOut()
    example = (torch.randn(3, 3), torch.randn(3, 2))
    path = fx.to_onnx(model, example, tmp_path / "two.onnx", input_names=["a", "c"], output_names=["y", "s"])
    session = _ort_session(path)
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("a", ["batch", 3]), ("c", ["batch", 2])]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [("y", ["batch", 2]), ("s", ["batch"])]
    a, c = torch.randn(6, 3), torch.randn(6, 2)
    y, s = session.run(None, {"a": a.numpy(), "c": c.numpy()})
    with torch.no_grad():
        expected_y, expected_s = model(a, c)
    torch.testing.assert_close(torch.from_numpy(y), expected_y, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(s), expected_s, rtol=0, atol=1e-5)


def test_onnx_static_shapes_at_a_chosen_opset(tmp_path, reference):
    onnx = pytest.importorskip("onnx")
    path = fx.to_onnx(reference, EXAMPLE, tmp_path / "static.onnx", dynamic_batch=False, opset=18)
    assert onnx.load(os.fspath(path)).opset_import[0].version == 18
    session = _ort_session(path)
    assert session.get_inputs()[0].shape == [4, 10]
    with torch.no_grad():
        expected = reference(EXAMPLE)
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"input": EXAMPLE.numpy()})[0]), expected, rtol=0, atol=1e-5)


def test_a_module_is_exported_in_eval_mode_and_its_flags_restored(tmp_path, reference):
    module = make_bn_mlp(seed=7, dropout=0.3)
    module.load_state_dict(reference.state_dict())
    module.train()
    module[1].eval()  # a mixed setting, restored exactly
    before = [m.training for m in module.modules()]
    pt2 = fx.to_pt2(module, EXAMPLE, tmp_path / "m.pt2")
    traced = fx.to_torchscript(module, EXAMPLE, tmp_path / "m.pt")
    assert [m.training for m in module.modules()] == before
    x = torch.randn(5, 10)
    with torch.no_grad():
        expected = reference(x)
    for fmt, path in (("pt2", pt2), ("trace", traced)):
        torch.testing.assert_close(_load(fmt, path)(x), expected, rtol=0, atol=1e-6)


def test_a_model_that_fixes_its_batch_needs_dynamic_batch_false(tmp_path):
    with pytest.raises(Exception, match="batch") as caught:
        fx.to_pt2(FixedBatch(), EXAMPLE, tmp_path / "fixed.pt2")
    assert any("to_pt2" in note and "pass dynamic_batch=False" in note for note in caught.value.__notes__)
    assert os.listdir(tmp_path) == []
    path = fx.to_pt2(FixedBatch(), EXAMPLE, tmp_path / "fixed.pt2", dynamic_batch=False)
    torch.testing.assert_close(_load("pt2", path)(EXAMPLE), EXAMPLE.reshape(4, -1) * 2, rtol=0, atol=0)


@pytest.mark.parametrize("export", [fx.to_pt2, fx.to_onnx], ids=["pt2", "onnx"])
def test_an_example_the_model_cannot_run_is_refused_before_export(export, tmp_path):
    step = fl.with_amp(fl.make_train_step(nn.Linear(10, 3), fl.losses.mse, adamw(1e-2)), dtype="bf16", mode="true")
    state = step.init()  # bfloat16 weights; a float32 example: torch.export captured it and wrote a .pt2 that fails on it
    path = tmp_path / ("model.pt2" if export is fx.to_pt2 else "model.onnx")
    with pytest.raises(RuntimeError, match="mat1 and mat2 must have the same dtype") as caught:
        export(state, EXAMPLE, path)
    assert any(f"{export.__name__}: the model in eval mode fails on the example" in n for n in caught.value.__notes__)
    assert os.listdir(tmp_path) == []
    program = torch.export.load(fx.to_pt2(state, EXAMPLE.bfloat16(), tmp_path / "model.pt2")).module()
    assert torch.equal(program(EXAMPLE.bfloat16()), fl.to_module(state)(EXAMPLE.bfloat16()))


class Counting(nn.Module):
    """Counts its calls in a buffer, in eval mode too."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(10, 2)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.linear(x)


@pytest.mark.parametrize("export", [fx.to_pt2, fx.to_onnx], ids=["pt2", "onnx"])
def test_exporting_a_module_leaves_its_buffers_as_they_were(export, tmp_path):
    module = Counting()
    export(module, EXAMPLE, tmp_path / ("model.pt2" if export is fx.to_pt2 else "model.onnx"))
    assert module.calls.item() == 0


def test_large_onnx_weights_go_to_a_data_file_beside_it(tmp_path, monkeypatch, reference):
    monkeypatch.setattr(fx, "_SINGLE_FILE_LIMIT", 0)
    path = fx.to_onnx(reference, EXAMPLE, tmp_path / "big.onnx")
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    x = torch.randn(6, 10)
    with torch.no_grad():
        expected = reference(x)
    torch.testing.assert_close(_load("onnx", path)(x), expected, rtol=0, atol=1e-5)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, trained):
    target = tmp_path / "model.pt2"
    target.write_bytes(b"old")

    def broken_save(program, f):
        with open(f, "wb") as file:
            file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch.export, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        fx.to_pt2(trained, EXAMPLE, target)
    assert os.listdir(tmp_path) == ["model.pt2"] and target.read_bytes() == b"old"


def test_an_onnx_file_that_fails_the_checker_is_not_written(tmp_path, monkeypatch):
    onnx = pytest.importorskip("onnx")

    def reject(path, full_check=False):
        assert os.path.exists(path) and full_check
        raise onnx.checker.ValidationError("rejected")

    monkeypatch.setattr(onnx.checker, "check_model", reject)
    with pytest.raises(onnx.checker.ValidationError, match="rejected"):
        fx.to_onnx(nn.Linear(3, 2), torch.randn(4, 3), tmp_path / "m.onnx", dynamic_batch=False)
    assert os.listdir(tmp_path) == []


def test_onnx_output_names_must_match_the_outputs(tmp_path):
    match = r"output_names must name each of the file's 1 outputs, the model's tensor outputs; got 2: \['y', 'z'\]"
    with pytest.raises(ValueError, match=match):
        fx.to_onnx(nn.Linear(3, 2), torch.randn(4, 3), tmp_path / "m.onnx", dynamic_batch=False, output_names=["y", "z"])
    assert os.listdir(tmp_path) == []


class WithNone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x):
        return self.linear(x), None


def test_onnx_output_names_name_the_files_outputs_not_a_none_output(tmp_path):
    path = fx.to_onnx(WithNone(), torch.randn(2, 4), tmp_path / "m.onnx", output_names=["y"])
    session = pytest.importorskip("onnxruntime").InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["y"]
    match = r"each of the file's 1 outputs, the model's tensor outputs \(1 None or constant output of the model is not in"
    with pytest.raises(ValueError, match=match):
        fx.to_onnx(WithNone(), torch.randn(2, 4), tmp_path / "n.onnx", output_names=["y", "ghost"])


def test_onnx_opset_the_exporter_cannot_produce_is_an_error(tmp_path, monkeypatch):
    onnx = pytest.importorskip("onnx")
    monkeypatch.setattr(onnx.defs, "onnx_opset_version", lambda: 40)  # pretend onnx knew opset 40
    with pytest.raises(RuntimeError, match="to_onnx: asked for opset 40, but torch's exporter produced opset"):
        fx.to_onnx(nn.Linear(3, 2), torch.randn(4, 3), tmp_path / "m.onnx", dynamic_batch=False, opset=40)
    assert os.listdir(tmp_path) == []


# ---- validation: before any export work, with where / expected / got in the message


@pytest.mark.parametrize("export", EXPORTERS, ids=lambda f: f.__name__)
def test_the_model_must_be_a_state_with_a_skeleton_or_a_module(export, trained, tmp_path):
    name = export.__name__
    with pytest.raises(TypeError, match=f"{name}: expected a fnlight.TrainState with a module skeleton .*, got dict"):
        export({}, EXAMPLE, tmp_path / "m.pt2")
    with pytest.raises(ValueError, match=f"{name}: this TrainState has no module skeleton"):
        export(trained.replace(skeleton=None), EXAMPLE, tmp_path / "m.pt2")


def test_a_donated_state_is_refused(tmp_path):
    step = fl.make_train_step(make_bn_mlp(), fl.losses.cross_entropy, adamw(1e-2))
    state = step.init()
    fl.fold(step, state, make_batches(1), progress=False, donate=True)
    with pytest.raises(fl.DonatedStateError, match="to_pt2: this TrainState was donated"):
        fx.to_pt2(state, EXAMPLE, tmp_path / "m.pt2")


@pytest.mark.parametrize("export", EXPORTERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    ("example", "error", "match"),
    [
        ([EXAMPLE], TypeError, "example must be a Tensor or a non-empty tuple of Tensors .*, got list"),
        ((), TypeError, r"example must be a Tensor or a non-empty tuple of Tensors .*, got tuple \(\)"),
        ((EXAMPLE, 3), TypeError, r"example\[1\] must be a Tensor, got int"),
    ],
)
def test_the_example_must_be_tensors(export, example, error, match, tmp_path):
    with pytest.raises(error, match=f"{export.__name__}: {match}"):
        export(nn.Linear(10, 2), example, tmp_path / "m.pt2")


@pytest.mark.parametrize("export", [fx.to_onnx, fx.to_pt2], ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    ("example", "dynamic_batch", "error", "match"),
    [
        (EXAMPLE, 1, TypeError, "dynamic_batch must be a bool, got 1"),
        (
            (EXAMPLE, torch.tensor(1.0)),
            True,
            ValueError,
            r"dynamic_batch=True .*, but example\[1\] is 0-d; pass dynamic_batch=False",
        ),
        (
            (EXAMPLE, EXAMPLE[:3]),
            True,
            ValueError,
            r"dynamic_batch=True .* dim 0 sizes differ: \[4, 3\]; pass dynamic_batch=False",
        ),
        (EXAMPLE[:1], True, ValueError, "dynamic_batch=True needs an example batch of at least 2 .*, got 1"),
    ],
)
def test_a_dynamic_batch_needs_one_shared_batch_of_two_or_more(export, example, dynamic_batch, error, match, tmp_path):
    with pytest.raises(error, match=f"{export.__name__}: {match}"):
        export(nn.Linear(10, 2), example, tmp_path / "m.pt2", dynamic_batch=dynamic_batch)


@pytest.mark.parametrize("export", EXPORTERS, ids=lambda f: f.__name__)
def test_the_path_must_name_a_file_in_an_existing_directory(export, tmp_path):
    name = export.__name__
    with pytest.raises(TypeError, match=f"{name}: path must be a str or os.PathLike, got int"):
        export(nn.Linear(10, 2), EXAMPLE, 3)
    with pytest.raises(TypeError, match=f"{name}: path must be a str or os.PathLike, got bytes"):
        export(nn.Linear(10, 2), EXAMPLE, b"m.pt2")
    with pytest.raises(IsADirectoryError, match=f"{name}: path must name a file, got the directory"):
        export(nn.Linear(10, 2), EXAMPLE, tmp_path)
    with pytest.raises(FileNotFoundError, match=f"{name}: the directory .*missing.* of path does not exist"):
        export(nn.Linear(10, 2), EXAMPLE, tmp_path / "missing" / "m.pt2")


def test_pt2_path_must_end_in_pt2(tmp_path):
    with pytest.raises(ValueError, match=r"to_pt2: path must end in '.pt2', got '.*model.zip'"):
        fx.to_pt2(nn.Linear(10, 2), EXAMPLE, tmp_path / "model.zip")


@pytest.mark.parametrize("opset", [17, 10_000, 18.0, True])
def test_onnx_opset_range(opset, tmp_path):
    with pytest.raises(ValueError, match=rf"to_onnx: opset must be None or an int from 18 to \d+ .*, got {opset!r}"):
        fx.to_onnx(nn.Linear(10, 2), EXAMPLE, tmp_path / "m.onnx", opset=opset)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"input_names": "x"}, TypeError, "input_names must be a sequence of str .*, got 'x'"),
        ({"output_names": [1]}, TypeError, r"output_names must be a sequence of str .*, got \[1\]"),
        ({"input_names": ["a", "b"]}, ValueError, r"input_names must name each of the 1 example inputs, got 2: \['a', 'b'\]"),
        ({"output_names": ["y", "y"]}, ValueError, r"output_names must be distinct, got \['y', 'y'\]"),
    ],
)
def test_onnx_names(options, error, match, tmp_path):
    with pytest.raises(error, match=f"to_onnx: {match}"):
        fx.to_onnx(nn.Linear(10, 2), EXAMPLE, tmp_path / "m.onnx", **options)


def test_onnx_needs_onnx_and_onnxscript(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ImportError, match=r"to_onnx needs the onnx and onnxscript packages: pip install 'fnlight\[export\]'"):
        fx.to_onnx(nn.Linear(10, 2), EXAMPLE, tmp_path / "m.onnx")


def test_torchscript_method(tmp_path):
    with pytest.raises(ValueError, match="to_torchscript: method must be 'trace' or 'script', got 'compile'"):
        fx.to_torchscript(nn.Linear(10, 2), EXAMPLE, tmp_path / "m.pt", method="compile")


def test_torchscript_without_torch_jit(tmp_path, monkeypatch):
    monkeypatch.delattr(torch.jit, "script")
    with pytest.raises(
        RuntimeError, match=r"to_torchscript: this torch \(.*\) no longer provides torch.jit.script; .* use fnlight.export.to_pt2"
    ):
        fx.to_torchscript(nn.Linear(10, 2), EXAMPLE, tmp_path / "m.pt", method="script")
    assert os.listdir(tmp_path) == []


def test_torchscript_lets_tracer_warnings_through(tmp_path):
    class Branchy(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x * 2 if x.shape[0] > 2 else x

    with pytest.warns(torch.jit.TracerWarning, match="Converting a tensor to a Python boolean"):
        fx.to_torchscript(Branchy(), EXAMPLE, tmp_path / "m.pt")
