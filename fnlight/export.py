"""Export a trained model to files other runtimes load: ONNX, ``torch.export`` (``.pt2``), TorchScript.

Every function takes a :class:`~fnlight.TrainState` (or a plain ``nn.Module``), an example of the
forward's positional inputs and a path, and returns the path it wrote:

- :func:`to_onnx` — an ONNX model from torch's dynamo exporter, checked by ``onnx.checker``;
  run it with onnxruntime (needs ``pip install 'fnlight[export]'``).
- :func:`to_pt2` — a ``torch.export`` archive; load it with ``torch.export.load(path)`` and call
  ``.module()`` on the result.
- :func:`to_torchscript` — a TorchScript file (deprecated by PyTorch; for consumers that still
  need it, such as libtorch C++ code).

The model is always exported in **eval mode**: dropout off, BatchNorm using its running
statistics. A state is turned into a fresh module by :func:`fnlight.to_module`; a module passed
directly is switched to eval mode for the export and its train/eval flags are restored after.
By default the batch dimension (dim 0 of every input) stays dynamic, so the file runs on any
batch size. Files are written atomically: the export goes to a hidden temporary beside the
target, which is renamed into place only once it is complete (and, for ONNX, checked), so a
failed export leaves no partial file and keeps an existing one intact.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._interop import _require_skeleton, to_module
from ._state import TrainState
from .checkpoint._io import _fsync_directory, temporary_stem

__all__ = ["to_onnx", "to_pt2", "to_torchscript"]

_MIN_OPSET = 18  # the lowest opset torch's dynamo exporter has implementations for
_SINGLE_FILE_LIMIT = 1536 * 2**20  # above this, ONNX weights go to "<name>.data" (protobuf caps a file at 2 GiB)
# torch 2.13's own decomposition code (run by the ONNX exporter) trips this deprecation in torch's pytree.
_TREESPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
# torch.jit.trace/script/save announce that TorchScript is deprecated; to_torchscript is the explicit opt-in.
_JIT_DEPRECATION = r"`torch\.jit\.\w+` is deprecated"


def to_onnx(
    model: TrainState | nn.Module,
    example: Tensor | tuple[Tensor, ...],
    path: str | os.PathLike[str],
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> pathlib.Path:
    """Write the model in eval mode as an ONNX file (torch's dynamo exporter) and check it.

    The model is captured with ``torch.export.export`` (so a batch dimension the model fixes is
    an error, never a silently static file), converted by ``torch.onnx.export(..., dynamo=True)``
    and validated with ``onnx.checker.check_model(full_check=True)`` before it is renamed into
    place. The file is self-contained; only when the weights exceed 1.5 GiB (protobuf caps a file
    at 2 GiB) do they go to ``<name>.data`` beside it. With ``dynamic_batch`` the batch axis of
    the inputs and outputs is named ``"batch"``.

    Args:
        model: a state with a module skeleton (from ``step.init()``), or an ``nn.Module``.
        example: the forward's positional inputs: a tensor or a tuple of tensors.
        path: the file to write (``.onnx`` by convention); its directory must exist.
        dynamic_batch: keep dim 0 of every input dynamic (one shared batch size; the example's
            must be at least 2, since torch.export fixes sizes 0 and 1); ``False`` fixes every
            shape to the example's.
        opset: the ONNX opset, from 18 to the newest the installed ``onnx`` knows; ``None``
            takes torch's default.
        input_names: one name per example input; ``None`` takes the forward's argument names.
        output_names: one name per output of the model; ``None`` lets torch name them.

    Returns:
        ``path`` as a ``pathlib.Path``.

    Raises:
        ImportError: ``onnx`` or ``onnxscript`` is not installed.
        TypeError, ValueError: an argument is of the wrong type or out of range (the message
            says which); ``output_names`` does not match the number of outputs.
        FileNotFoundError, IsADirectoryError: ``path``'s directory is missing, or ``path`` is a
            directory.
        RuntimeError: torch could not produce the requested opset.

    >>> import tempfile, torch, onnxruntime, fnlight as fl
    >>> state = fl.make_train_step(torch.nn.Linear(3, 2), fl.losses.mse, fl.optim.sgd(0.1)).init()
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = fl.export.to_onnx(state, torch.randn(4, 3), f"{d}/model.onnx", input_names=["x"])
    ...     session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    ...     session.run(None, {"x": torch.randn(7, 3).numpy()})[0].shape
    (7, 2)
    """
    where = "to_onnx"
    _check_model(model, where)
    inputs = _check_example(example, dynamic_batch, where)
    target = _check_path(path, None, where)
    onnx = _import_onnx(where)
    opset = _check_opset(opset, onnx.defs.onnx_opset_version(), where)
    input_names = _check_names(input_names, "input_names", where, count=len(inputs))
    output_names = _check_names(output_names, "output_names", where)

    with _eval_mode(model) as module:
        program = _export(module, inputs, dynamic_batch, where)
        outputs = _tensor_outputs(program)
        if output_names is not None and len(output_names) != outputs:
            left = len(program.graph_signature.user_outputs) - outputs
            plural, verb = ("s", "are") if left != 1 else ("", "is")
            constants = f" ({left} None or constant output{plural} of the model {verb} not in the file)" if left else ""
            raise ValueError(
                f"{where}: output_names must name each of the file's {outputs} outputs, the model's tensor "
                f"outputs{constants}; got {len(output_names)}: {output_names!r}"
            )
        nbytes = sum(t.nbytes for t in (*module.parameters(), *module.buffers()))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_TREESPEC_WARNING, category=FutureWarning)
            onnx_program = torch.onnx.export(
                program, dynamo=True, opset_version=opset, input_names=input_names, output_names=output_names, verbose=False
            )
    produced = onnx_program.model.opset_imports.get("")
    if opset is not None and produced != opset:
        raise RuntimeError(
            f"{where}: asked for opset {opset}, but torch's exporter produced opset {produced} (its version "
            f"conversion failed; see the log above); pass an opset it supports, or opset=None"
        )
    if dynamic_batch:
        onnx_program.rename_axes({onnx_program.model.graph.inputs[0].shape[0]: "batch"})
    with _staged(target) as tmp:
        onnx_program.save(tmp, external_data=nbytes > _SINGLE_FILE_LIMIT)
        onnx.checker.check_model(os.fspath(tmp), full_check=True)
    return target


def to_pt2(
    model: TrainState | nn.Module,
    example: Tensor | tuple[Tensor, ...],
    path: str | os.PathLike[str],
    *,
    dynamic_batch: bool = True,
) -> pathlib.Path:
    """Write the model in eval mode as a ``torch.export`` archive (``.pt2``).

    Load it back with ``torch.export.load(path)``; ``.module()`` on the loaded program gives a
    callable module. The archive holds the graph and the weights, not the model's Python code.

    Args:
        model, example, dynamic_batch: as for :func:`to_onnx`.
        path: the file to write; it must end in ``.pt2`` and its directory must exist.

    Returns:
        ``path`` as a ``pathlib.Path``.

    Raises:
        TypeError, ValueError, FileNotFoundError, IsADirectoryError: as for :func:`to_onnx`;
            also ``ValueError`` for a path without the ``.pt2`` suffix.

    >>> import tempfile, torch, fnlight as fl
    >>> state = fl.make_train_step(torch.nn.Linear(3, 2), fl.losses.mse, fl.optim.sgd(0.1)).init()
    >>> with tempfile.TemporaryDirectory() as d:
    ...     program = torch.export.load(fl.export.to_pt2(state, torch.randn(4, 3), f"{d}/model.pt2"))
    ...     program.module()(torch.randn(7, 3)).shape
    torch.Size([7, 2])
    """
    where = "to_pt2"
    _check_model(model, where)
    inputs = _check_example(example, dynamic_batch, where)
    target = _check_path(path, ".pt2", where)
    with _eval_mode(model) as module:
        program = _export(module, inputs, dynamic_batch, where)
    with _staged(target) as tmp:
        torch.export.save(program, tmp)
    return target


def to_torchscript(
    model: TrainState | nn.Module,
    example: Tensor | tuple[Tensor, ...],
    path: str | os.PathLike[str],
    *,
    method: Literal["trace", "script"] = "trace",
) -> pathlib.Path:
    """Write the model in eval mode as a TorchScript file (deprecated by PyTorch; prefer :func:`to_pt2`).

    TorchScript is deprecated in PyTorch 2.x: ``torch.jit.trace``, ``script`` and ``save``
    emit a ``DeprecationWarning`` on every call. Calling this function is the explicit choice
    of the format, so it silences exactly those notices (and nothing else: a ``TracerWarning``
    about a trace that will not generalise still reaches you). ``torch.jit.load`` warns too.

    ``method="trace"`` records the operations run on ``example`` (the batch size stays free
    unless the model branches on shapes in Python); ``"script"`` compiles the forward's source,
    keeping its control flow, and then runs the result once on ``example`` so that a module
    that compiles but fails at run time fails here.

    Args:
        model, example: as for :func:`to_onnx` (the example's batch may be any size here).
        path: the file to write (``.pt`` by convention); its directory must exist.
        method: ``"trace"`` or ``"script"``.

    Returns:
        ``path`` as a ``pathlib.Path``.

    Raises:
        TypeError, ValueError, FileNotFoundError, IsADirectoryError: as for :func:`to_onnx`;
            also ``ValueError`` for an unknown ``method``.
        RuntimeError: this torch no longer provides TorchScript.

    >>> import tempfile, warnings, torch, fnlight as fl
    >>> state = fl.make_train_step(torch.nn.Linear(3, 2), fl.losses.mse, fl.optim.sgd(0.1)).init()
    >>> with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
    ...     path = fl.export.to_torchscript(state, torch.randn(4, 3), f"{d}/model.pt")
    ...     warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load is deprecated too
    ...     torch.jit.load(path)(torch.randn(7, 3)).shape
    torch.Size([7, 2])
    """
    where = "to_torchscript"
    _check_model(model, where)
    inputs = _check_example(example, False, where)
    target = _check_path(path, None, where)
    if method not in ("trace", "script"):
        raise ValueError(f"{where}: method must be 'trace' or 'script', got {method!r}")
    if not (hasattr(torch.jit, method) and hasattr(torch.jit, "save")):
        raise RuntimeError(
            f"{where}: this torch ({torch.__version__}) no longer provides torch.jit.{method}; TorchScript "
            "was deprecated in favour of torch.export: use fnlight.export.to_pt2"
        )
    with _eval_mode(model) as module, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_JIT_DEPRECATION, category=DeprecationWarning)
        if method == "trace":
            compiled = torch.jit.trace(module, inputs)
        else:
            compiled = torch.jit.script(module)
            with torch.no_grad():
                compiled(*inputs)
        with _staged(target) as tmp:
            torch.jit.save(compiled, tmp)
    return target


def _tensor_outputs(program: Any) -> int:
    """How many of an exported program's user outputs are tensors (the ONNX file's outputs; None and constants are dropped)."""
    from torch.export.graph_signature import OutputKind, TensorArgument

    specs = program.graph_signature.output_specs
    return sum(1 for spec in specs if spec.kind == OutputKind.USER_OUTPUT and isinstance(spec.arg, TensorArgument))


def _check_model(model: Any, where: str) -> None:
    if isinstance(model, TrainState):
        _require_skeleton(model, where)
    elif not isinstance(model, nn.Module):
        raise TypeError(
            f"{where}: expected a fnlight.TrainState with a module skeleton (or an nn.Module), got {type(model).__name__}"
        )


def _check_example(example: Any, dynamic_batch: Any, where: str) -> tuple[Tensor, ...]:
    inputs = (example,) if isinstance(example, Tensor) else example
    if not isinstance(inputs, tuple) or not inputs:
        raise TypeError(
            f"{where}: example must be a Tensor or a non-empty tuple of Tensors (the forward's positional inputs), "
            f"got {type(example).__name__}{' ()' if inputs == () else ''}"
        )
    for i, t in enumerate(inputs):
        if not isinstance(t, Tensor):
            raise TypeError(f"{where}: example[{i}] must be a Tensor, got {type(t).__name__}")
    if not isinstance(dynamic_batch, bool):
        raise TypeError(f"{where}: dynamic_batch must be a bool, got {dynamic_batch!r}")
    if dynamic_batch:
        scalars = [i for i, t in enumerate(inputs) if t.dim() == 0]
        if scalars:
            raise ValueError(
                f"{where}: dynamic_batch=True makes dim 0 of every input the batch, but example[{scalars[0]}] is 0-d; "
                "pass dynamic_batch=False"
            )
        sizes = [t.shape[0] for t in inputs]
        if len(set(sizes)) > 1:
            raise ValueError(
                f"{where}: dynamic_batch=True makes dim 0 of every input one shared batch size, but the example's "
                f"dim 0 sizes differ: {sizes}; pass dynamic_batch=False"
            )
        if sizes[0] < 2:
            raise ValueError(
                f"{where}: dynamic_batch=True needs an example batch of at least 2 (torch.export fixes sizes 0 and 1 "
                f"as constants), got {sizes[0]}"
            )
    return inputs


def _check_path(path: Any, suffix: str | None, where: str) -> pathlib.Path:
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise TypeError(f"{where}: path must be a str or os.PathLike, got {type(path).__name__}")
    target = pathlib.Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{where}: path must name a file, got the directory {os.fspath(path)!r}")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"{where}: the directory {os.fspath(target.parent)!r} of path does not exist; create it first")
    if suffix is not None and target.suffix != suffix:
        raise ValueError(f"{where}: path must end in {suffix!r}, got {os.fspath(path)!r}")
    return target


def _check_opset(opset: Any, newest: int, where: str) -> int | None:
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or not _MIN_OPSET <= opset <= newest):
        raise ValueError(
            f"{where}: opset must be None or an int from {_MIN_OPSET} to {newest} (the installed onnx's newest), got {opset!r}"
        )
    return opset


def _check_names(names: Any, what: str, where: str, *, count: int | None = None) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{where}: {what} must be a sequence of str (e.g. [{'x'!r}]), got {names!r}")
    if count is not None and len(names) != count:
        raise ValueError(f"{where}: {what} must name each of the {count} example inputs, got {len(names)}: {list(names)!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: {what} must be distinct, got {list(names)!r}")
    return list(names)


def _import_onnx(where: str) -> Any:
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's dynamo exporter needs it)
    except ImportError as e:
        raise ImportError(f"{where} needs the onnx and onnxscript packages: pip install 'fnlight[export]'") from e
    return onnx


@contextlib.contextmanager
def _eval_mode(model: TrainState | nn.Module) -> Iterator[nn.Module]:
    """The model as a module in eval mode: a fresh one for a state, the module itself (flags restored after) otherwise."""
    if isinstance(model, TrainState):
        yield to_module(model)  # a new module with copies of the state's tensors, in eval mode
        return
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


def _export(module: nn.Module, inputs: tuple[Tensor, ...], dynamic_batch: bool, where: str) -> torch.export.ExportedProgram:
    # torch.export can capture a graph the model cannot run (a float32 example for bfloat16 weights): run it once first,
    # putting back any buffer the forward updates (a module passed in is the caller's)
    saved = [(b, b.clone()) for b in module.buffers()]
    try:
        with torch.no_grad():
            module(*inputs)
            for b, value in saved:
                b.copy_(value)
    except Exception as e:
        e.add_note(
            f"fnlight: {where}: the model in eval mode fails on the example (shapes {[list(t.shape) for t in inputs]}, "
            f"dtypes {[str(t.dtype) for t in inputs]}), so an exported file would fail on it too"
        )
        raise
    batch = torch.export.Dim("batch")
    shapes = tuple({0: batch} for _ in inputs) if dynamic_batch else None
    try:
        return torch.export.export(module, inputs, dynamic_shapes=shapes)
    except Exception as e:
        hint = " (if the model fixes its batch size, pass dynamic_batch=False)" if dynamic_batch else ""
        e.add_note(
            f"fnlight: {where}: torch.export.export failed on the model in eval mode with example shapes "
            f"{[list(t.shape) for t in inputs]} and dynamic_batch={dynamic_batch}{hint}"
        )
        raise


@contextlib.contextmanager
def _staged(target: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yield a path in a fresh hidden directory beside ``target``; once the body succeeds, move what it wrote into place.

    Side files (ONNX external data) are moved first and ``target`` last, each fsynced and renamed
    atomically, then the directory is fsynced; the staging directory is removed whatever happens.
    """
    stage = pathlib.Path(tempfile.mkdtemp(prefix=f".{temporary_stem(target.name)}.", suffix=".tmp", dir=target.parent))
    try:
        staged = stage / target.name
        yield staged
        for file in sorted(stage.iterdir(), key=lambda f: f == staged):
            with open(file, "rb") as f:
                os.fsync(f.fileno())
            os.replace(file, target.parent / file.name)
        _fsync_directory(os.fspath(target.parent))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
