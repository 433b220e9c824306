"""Checkpoint file format: round trips (every dtype, odd layouts, 2 GiB), atomic save, mismatch
reports, and damage of every kind (truncation, bit flips, garbage, hostile indexes)."""

import math
import os
import pickle
import re
import tempfile
import zlib

import msgpack
import optree
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fnlight as fl
import fnlight.checkpoint._format as ck_format
import fnlight.checkpoint._io as ck_io
import fnlight.checkpoint._stream as ck_stream
from fnlight.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    CheckpointMismatchError,
    read_metadata,
    restore,
    save,
)
from fnlight.checkpoint._format import DTYPES, align, decode_index, footer, preamble
from fnlight.checkpoint._leaves import flatten, path_str
from fnlight.optim import adamw
from tests.conftest import make_batches, make_bn_mlp

# --- helpers -----------------------------------------------------------------------------------


def bits(t: torch.Tensor) -> bytes:
    """The row-major bytes of any tensor (comparable for every dtype, NaN payloads included)."""
    t = ck_stream.as_bits(t.resolve_conj().resolve_neg()).contiguous()
    return bytes(ck_stream.byte_view(t)) if t.numel() else b""


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bits(a) == bits(b)


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (math.prod(shape) * dtype.itemsize,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw &= 1
    return raw.view(dtype).reshape(shape)


def raises(path, text: str, error: type[Exception] = CheckpointError):
    """``pytest.raises`` for a message naming the file and containing ``text`` (a regex)."""
    return pytest.raises(error, match="(?s)" + re.escape(str(path)) + ".*" + text)


def trained_state(steps: int = 3, seed: int = 0):
    step = fl.make_train_step(make_bn_mlp(seed), fl.losses.cross_entropy, adamw(1e-3))
    state = step.init(seed=seed)
    for batch in make_batches(steps):
        state, _ = step(state, batch)
    return step, state


def index_dict(leaves: list, **changes) -> dict:
    index = {
        "format": "fnlight.checkpoint",
        "version": FORMAT_VERSION,
        "alignment": 64,
        "checksum": "crc32",
        "versions": {"fnlight": "0", "torch": "0", "python": "3"},
        "metadata": {},
        "leaves": leaves,
    }
    index.update(changes)
    return index


def craft(path, index, data: bytes = b"") -> None:
    """Write a file with a valid preamble, footer and index checksum around ``index``."""
    raw = index if isinstance(index, bytes) else msgpack.packb(index)
    body = preamble() + data
    body += bytes(align(len(body)) - len(body))
    path.write_bytes(body + raw + footer(len(body), len(raw), zlib.crc32(raw)))


SMALL_TREE = {
    "w": random_tensor(torch.float32, (3, 5), 1),
    "h": random_tensor(torch.bfloat16, (7,), 2),
    "flag": torch.tensor(True),
    "nothing": torch.zeros(0, 3),
    "lr": 0.25,
    "name": "run-1",
    "count": 3,
}


def small_target():
    return optree.tree_map(lambda x: torch.empty_like(x) if isinstance(x, torch.Tensor) else x, SMALL_TREE)


def small_checkpoint_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        save(f"{d}/c", SMALL_TREE, metadata={"epoch": 2})
        with open(f"{d}/c", "rb") as f:
            return f.read()


SMALL = small_checkpoint_bytes()


@pytest.fixture(scope="module")
def damage_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("damage")


# --- round trips -------------------------------------------------------------------------------


def test_train_state_round_trip_is_bitwise_and_training_continues_identically(tmp_path):
    step, state = trained_state()
    save(tmp_path / "s.ckpt", state, metadata={"epoch": 1})
    target = step.init(seed=123)  # a fresh state: its own skeleton, different values
    before = fl.tree_clone(target)
    back = restore(tmp_path / "s.ckpt", target)
    assert back.skeleton is target.skeleton and fl.tree_equal(target, before)
    assert fl.tree_equal(back, state.replace(skeleton=target.skeleton))
    batch = make_batches(1, seed=7)[0]
    (a, _), (b, _) = step(state, batch), step(back, batch)
    assert fl.tree_equal(a.replace(skeleton=None), b.replace(skeleton=None))


def test_paths_use_field_names_for_named_tuples():
    pairs, _ = flatten(trained_state(0)[1])
    names = {path_str(p) for p, _ in pairs}
    assert {"params.0.weight", "opt_state.mu.0.weight", "opt_state.hparams.lr", "data.epoch", "stop"} <= names


def test_allow_list_covers_every_non_quantized_torch_dtype():
    every = {str(v).removeprefix("torch.") for v in vars(torch).values() if isinstance(v, torch.dtype)}
    quantized = {n for n in every if n.startswith(("qint", "quint"))}
    assert every - quantized <= set(DTYPES), sorted(every - quantized - set(DTYPES))


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_dtype_round_trips_in_every_layout(tmp_path, name):
    dtype = DTYPES[name]
    base = random_tensor(dtype, (4, 6), seed=len(name))
    tree = {"plain": base, "zero_d": base[1, 2], "empty": base[:0], "transposed": base.t(), "strided": base[::2, 1::3]}
    save(tmp_path / "d.ckpt", tree)
    back = restore(tmp_path / "d.ckpt", tree)
    for key, t in tree.items():
        assert back[key].is_contiguous() and same(back[key], t), key


def test_odd_layouts_are_copied_in_small_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(ck_stream, "COPY_CHUNK", 48)
    x = torch.randn(20, 30, dtype=torch.float64)
    tree = {
        "transposed": x.t(),
        "sliced": x[2:17:3, ::7],
        "expanded": torch.randn(1, 40).expand(9, 40),
        "conj": torch.randn(5, 7, dtype=torch.complex64).conj(),
        "neg": torch._neg_view(torch.randn(6, 9)),
        "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "big_rows": torch.randn(3, 50)[:, ::2],
    }
    save(tmp_path / "o.ckpt", tree)
    back = restore(tmp_path / "o.ckpt", tree)
    for key, t in tree.items():
        assert back[key].is_contiguous() and torch.equal(back[key], t.resolve_conj().resolve_neg()), key


def test_python_leaves_round_trip_with_their_types(tmp_path):
    tree = {"i": -(2**63), "u": 2**64 - 1, "f": float("inf"), "b": False, "s": "é", "n": None, "t": torch.ones(1)}
    save(tmp_path / "p.ckpt", tree)
    back = restore(tmp_path / "p.ckpt", {"i": 0, "u": 0, "f": 0.0, "b": True, "s": "", "n": None, "t": torch.zeros(1)})
    assert back == {**tree, "t": back["t"]} and [type(back[k]) for k in "iufbs"] == [int, int, float, bool, str]


def test_meta_target_restores_to_cpu_and_target_device_is_kept(tmp_path):
    save(tmp_path / "m.ckpt", {"w": torch.arange(6.0).reshape(2, 3)})
    back = restore(tmp_path / "m.ckpt", {"w": torch.empty(2, 3, device="meta")})
    assert back["w"].device.type == "cpu" and back["w"].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_empty_tensors_on_the_meta_device_save_as_they_hold_no_bytes(tmp_path):
    # only a meta tensor with elements is refused (it has data it cannot give): an empty one is all shape
    tree = {
        "e": torch.empty(0, 3, device="meta"),
        "t": torch.empty(2, 0, dtype=torch.bfloat16, device="meta").t(),
        "x": torch.arange(3),
    }
    save(tmp_path / "e.ckpt", tree)
    back = restore(
        tmp_path / "e.ckpt",
        {"e": torch.empty(0, 3), "t": torch.empty(0, 2, dtype=torch.bfloat16), "x": torch.zeros(3, dtype=torch.int64)},
    )
    assert back["e"].shape == (0, 3) and back["t"].shape == (0, 2) and back["t"].dtype == torch.bfloat16
    assert torch.equal(back["x"], torch.arange(3))


def test_large_tensors_read_into_prefaulted_memory(tmp_path):
    t = torch.arange(3 << 20, dtype=torch.int32)  # 12 MiB: prefaulted before the read
    save(tmp_path / "h.ckpt", {"t": t})
    assert torch.equal(restore(tmp_path / "h.ckpt", {"t": torch.empty_like(t)})["t"], t)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.one_of(
            st.tuples(
                st.sampled_from(["float32", "bfloat16", "float8_e5m2", "int8", "uint16", "bool", "complex64", "float64"]),
                st.lists(st.integers(0, 4), max_size=3),
                st.integers(0, 2**31),
            ),
            st.one_of(st.integers(-(2**63), 2**63), st.floats(allow_nan=False), st.booleans(), st.text(max_size=5)),
        ),
        max_size=6,
    )
)
def test_random_trees_round_trip(damage_dir, spec):
    tree = {k: random_tensor(DTYPES[v[0]], tuple(v[1]), v[2]) if isinstance(v, tuple) else v for k, v in spec.items()}
    save(damage_dir / "r.ckpt", tree)
    back = restore(damage_dir / "r.ckpt", tree)
    assert back.keys() == tree.keys()
    for k, v in tree.items():
        assert same(back[k], v) if isinstance(v, torch.Tensor) else (type(back[k]) is type(v) and back[k] == v)


def test_tensor_over_2_gib_round_trips(tmp_path):
    n = (2 << 30) + 4099
    t = torch.zeros(n, dtype=torch.uint8)  # untouched pages stay unallocated: ~1x the tensor in RSS
    t[:: 1 << 20] = (torch.arange(len(t[:: 1 << 20])) % 251 + 1).to(torch.uint8)  # a distinct mark per MiB
    for start in (0, (2 << 30) - 3000, n - 5000):  # random bytes across the 2 GiB boundary and at the end
        t[start : start + 5000] = torch.randint(0, 256, (min(5000, n - start),), dtype=torch.uint8)
    path = tmp_path / "big.ckpt"
    try:
        save(path, {"big": t, "after": torch.arange(3)})
        assert os.path.getsize(path) > n
        target = {"big": torch.empty(n, dtype=torch.uint8, device="meta"), "after": torch.zeros(3, dtype=torch.int64)}
        back = restore(path, target)
        assert torch.equal(back["big"], t) and back["after"].tolist() == [0, 1, 2]
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_saved_in_pieces_and_restored_to_the_target_device(tmp_path, monkeypatch):
    monkeypatch.setattr(ck_stream, "COPY_CHUNK", 1024)
    tree = {"w": torch.randn(64, 48, device="cuda"), "t": torch.randn(40, 30, device="cuda").t()}
    save(tmp_path / "g.ckpt", tree)
    back = restore(tmp_path / "g.ckpt", tree)
    assert all(back[k].device == tree[k].device and torch.equal(back[k], tree[k]) for k in tree)
    cpu = restore(tmp_path / "g.ckpt", {k: v.cpu() for k, v in tree.items()})
    assert all(cpu[k].device.type == "cpu" and torch.equal(cpu[k], tree[k].cpu()) for k in tree)


# --- atomic save -------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_crash_mid_save_keeps_the_previous_checkpoint_and_leaves_no_temporary(tmp_path, monkeypatch, error):
    path = tmp_path / "c.ckpt"
    save(path, SMALL_TREE)
    old = path.read_bytes()
    calls = []
    real = ck_stream.Checksummer.write

    def crash_on_third(self, w, t, key):
        calls.append(1)
        if len(calls) == 3:
            raise error
        return real(self, w, t, key)

    monkeypatch.setattr(ck_stream.Checksummer, "write", crash_on_third)
    new = {k: (v + 1 if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else v) for k, v in SMALL_TREE.items()}
    with pytest.raises(type(error)):
        save(path, new)
    assert len(calls) == 3 and path.read_bytes() == old and os.listdir(tmp_path) == ["c.ckpt"]
    assert fl.tree_equal(restore(path, small_target()), SMALL_TREE)


def test_a_crash_while_large_tensors_are_checksummed_stops_the_worker(tmp_path, monkeypatch):
    big = {"a": torch.randn(1 << 19), "b": torch.randn(1 << 19)}  # 2 MiB each: checksummed on the worker
    real = ck_stream.Checksummer.write

    def crash_on_second(self, w, t, key):
        if key == ("b",):
            raise OSError("disk full")
        return real(self, w, t, key)

    monkeypatch.setattr(ck_stream.Checksummer, "write", crash_on_second)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path / "c.ckpt", big)
    assert os.listdir(tmp_path) == [] and not _crc_workers()


def test_crash_on_first_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(ck_stream.Checksummer, "write", lambda self, w, t, key: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        save(tmp_path / "c.ckpt", SMALL_TREE)
    assert os.listdir(tmp_path) == []


def test_save_replaces_an_existing_file_with_umask_permissions(tmp_path):
    path = tmp_path / "c.ckpt"
    save(path, {"a": torch.ones(2)})
    save(path, {"a": torch.full((2,), 5.0)})
    assert restore(path, {"a": torch.empty(2)})["a"].tolist() == [5.0, 5.0]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask and os.listdir(tmp_path) == ["c.ckpt"]


def test_save_refuses_a_directory_path(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory; save needs a file path"):
        save(tmp_path, SMALL_TREE)


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        ("", ValueError, r"save needs a file path, got '' \(no file name: empty, or ending with a separator\)"),
        ("new/", ValueError, r"save needs a file path, got 'new/' \(no file name"),
        ("missing/c.ckpt", FileNotFoundError, r"the directory 'missing' to save 'c.ckpt' in does not exist"),
    ],
)
def test_save_refuses_a_path_without_a_file_name_or_directory_before_writing(tmp_path, monkeypatch, name, error, message):
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    with pytest.raises(error, match=message):
        save(name, SMALL_TREE)
    assert os.listdir(tmp_path) == ["run"] and os.listdir(tmp_path / "run") == []  # nothing written, not even beside


def test_save_writes_its_temporary_where_the_path_leads_through_links_and_takes_bytes(tmp_path, monkeypatch):
    (tmp_path / "elsewhere" / "real").mkdir(parents=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "link").symlink_to(tmp_path / "elsewhere" / "real")
    monkeypatch.chdir(tmp_path / "run")
    opened = []
    monkeypatch.setattr(ck_io, "_open_temporary", lambda d, n, real=ck_io._open_temporary: opened.append(d) or real(d, n))
    save("link/../a.ckpt", SMALL_TREE)  # the file system resolves link/.. to elsewhere/, not to run/
    save(b"link/../b.ckpt", SMALL_TREE)
    assert all(os.path.samefile(d, tmp_path / "elsewhere") for d in opened)  # beside the target: one rename, same disk
    assert sorted(os.listdir(tmp_path / "elsewhere")) == ["a.ckpt", "b.ckpt", "real"]
    assert fl.tree_equal(restore(tmp_path / "elsewhere" / "b.ckpt", small_target()), SMALL_TREE)


# --- what save refuses -------------------------------------------------------------------------


def quantized() -> torch.Tensor:
    with pytest.warns(UserWarning, match="quantized tensor creation functions .* are deprecated"):
        return torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8)


@pytest.mark.parametrize(
    ("make_tree", "error", "message"),
    [
        (lambda: {"a": {"b": object()}}, TypeError, r"the leaf at a\.b is a object; a checkpoint stores torch\.Tensor"),
        (lambda: {"a": [1, 2**64]}, ValueError, r"the int leaf at a\.1 = 18446744073709551616 does not fit in 64 bits"),
        (
            lambda: {(1, 2): torch.ones(1)},
            TypeError,
            r"the key \(1, 2\) under <root> is a tuple; checkpoints support str and int",
        ),
        (lambda: {True: torch.ones(1)}, TypeError, r"the key True under <root> is a bool"),
        (
            lambda: {"layers": {2**64: torch.ones(1)}},
            ValueError,
            r"the int key 18446744073709551616 under layers does not fit in 64 bits",
        ),
        (
            lambda: {"q": torch.ones(2).to_sparse()},
            TypeError,
            r"the tensor at q has layout torch\.sparse_coo; only dense strided",
        ),
        (lambda: {"q": quantized()}, TypeError, r"the tensor at q is quantized \(torch\.quint8\); dequantize it"),
        (lambda: {"s": "\ud800"}, ValueError, r"the str leaf at s is not encodable as UTF-8 \(surrogates not allowed"),
        (lambda: {"\ud800": 1}, ValueError, r"the key '\\ud800' under <root> is not encodable as UTF-8"),
        (lambda: {"m": torch.empty(2, device="meta")}, TypeError, r"the tensor at m is on the meta device and has no data"),
    ],
)
def test_save_rejects_unsupported_leaves_before_creating_a_file(tmp_path, make_tree, error, message):
    tree = make_tree()
    with pytest.raises(error, match=message):
        save(tmp_path / "x.ckpt", tree)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("metadata", "error", "message"),
    [
        ([1], TypeError, r"metadata must be a dict with str keys, got list"),
        ({"run": {"tags": ("a",)}}, TypeError, r"metadata\['run'\]\['tags'\] is a tuple; .*use a list instead"),
        ({"a": [1, {2: "x"}]}, TypeError, r"metadata\['a'\]\[1\] has the key 2 of type int; keys must be str"),
        ({"a": {"b": {1, 2}}}, TypeError, r"metadata\['a'\]\['b'\] is a set; expected None, bool, int, float, str"),
        ({"a": b"x"}, TypeError, r"metadata\['a'\] is a bytes"),
        ({"a": [0, -(2**63) - 1]}, ValueError, r"metadata\['a'\]\[1\] = -9223372036854775809 does not fit in 64 bits"),
        ({"a": torch.ones(1)}, TypeError, r"metadata\['a'\] is a Tensor"),
        ({"a": ["\udc80"]}, ValueError, r"metadata\['a'\]\[0\] is not encodable as UTF-8"),
    ],
)
def test_metadata_is_validated_at_save(tmp_path, metadata, error, message):
    with pytest.raises(error, match=message):
        save(tmp_path / "x.ckpt", SMALL_TREE, metadata=metadata)
    assert os.listdir(tmp_path) == []


def test_metadata_nesting_is_limited(tmp_path):
    deep: dict = {}
    node = deep
    for _ in range(70):
        node["k"] = {}
        node = node["k"]
    with pytest.raises(ValueError, match=r"metadata\['k'\].* is nested deeper than 64 levels"):
        save(tmp_path / "x.ckpt", SMALL_TREE, metadata=deep)


# --- read_metadata -----------------------------------------------------------------------------


def test_read_metadata_returns_metadata_and_versions_without_reading_tensors(tmp_path):
    meta = {"epoch": 3, "best": {"loss": 0.5, "at": [1, 2]}, "note": None, "ok": True}
    path = tmp_path / "m.ckpt"
    save(path, SMALL_TREE, metadata=meta)
    data = bytearray(path.read_bytes())
    data[64] ^= 0xFF  # damage the first tensor's bytes (flag): only restore reads (and checks) them
    path.write_bytes(bytes(data))
    info = read_metadata(path)
    assert info == {
        "format_version": FORMAT_VERSION,
        "versions": {"fnlight": fl.__version__, "torch": torch.__version__, "python": info["versions"]["python"]},
        "metadata": meta,
    }
    with raises(path, r"checksum mismatch in the tensor flag \(stored crc32 0x"):
        restore(path, small_target())


def test_read_metadata_without_metadata_gives_an_empty_dict(tmp_path):
    save(tmp_path / "m.ckpt", {"a": 1})
    assert read_metadata(tmp_path / "m.ckpt")["metadata"] == {}


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        restore(tmp_path / "nope.ckpt", SMALL_TREE)
    with pytest.raises(FileNotFoundError):
        read_metadata(tmp_path / "nope.ckpt")


# --- mismatch against the target ---------------------------------------------------------------


def test_mismatch_lists_missing_unexpected_and_mismatched_leaves(tmp_path):
    _, state = trained_state(1)
    path = tmp_path / "s.ckpt"
    save(path, state.with_slot("ema", {"decay": 0.9, "w": torch.ones(2)}))
    torch.manual_seed(0)
    other = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    target = fl.make_train_step(other, fl.losses.cross_entropy, adamw(1e-3)).init()
    target = target.replace(key=target.key.to(torch.int32)).with_slot("ema", {"decay": 1, "extra": 0})
    with pytest.raises(CheckpointMismatchError) as info:
        restore(path, target)
    e = info.value
    assert e.missing == ["slots.ema.extra"] and e.unexpected == ["slots.ema.w"]
    assert e.mismatched == [
        "params.3.bias: expected tensor float32[4], found tensor float32[3]",
        "params.3.weight: expected tensor float32[4, 32], found tensor float32[3, 32]",
        "opt_state.mu.3.bias: expected tensor float32[4], found tensor float32[3]",
        "opt_state.mu.3.weight: expected tensor float32[4, 32], found tensor float32[3, 32]",
        "opt_state.nu.3.bias: expected tensor float32[4], found tensor float32[3]",
        "opt_state.nu.3.weight: expected tensor float32[4, 32], found tensor float32[3, 32]",
        "key: expected tensor int32[], found tensor int64[]",
        "slots.ema.decay: expected int, found float",
    ]
    message = str(e)
    assert message.startswith(f"checkpoint {path} does not match the target tree (10 problems):")
    for line in ("missing from the file (1):\n    slots.ema.extra", "unexpected in the file (not in the target) (1):"):
        assert line in message
    assert isinstance(e, CheckpointError)
    assert str(pickle.loads(pickle.dumps(e))) == message


def test_mismatch_with_a_tensor_where_a_value_was_saved(tmp_path):
    save(tmp_path / "v.ckpt", {"a": 1, "b": torch.ones(2)})
    with raises(tmp_path / "v.ckpt", r"a: expected tensor float32\[\], found int.*b: expected int, found tensor float32\[2\]"):
        restore(tmp_path / "v.ckpt", {"a": torch.tensor(1.0), "b": 0})


# --- damage: empty, garbage, truncated, flipped ------------------------------------------------


def test_empty_file(tmp_path):
    (tmp_path / "e.ckpt").write_bytes(b"")
    with raises(tmp_path / "e.ckpt", r"the file is empty \(0 bytes\)"):
        restore(tmp_path / "e.ckpt", SMALL_TREE)
    with raises(tmp_path / "e.ckpt", "the file is empty"):
        read_metadata(tmp_path / "e.ckpt")


def test_a_name_of_255_bytes_saves(tmp_path):
    """The temporary file beside the target is named after it: cut so that it still fits in a file name."""
    target = tmp_path / ("é" + "x" * 253)  # 255 bytes in UTF-8
    fl.checkpoint.save(target, {"w": torch.ones(2)})
    assert torch.equal(fl.checkpoint.restore(target, {"w": torch.zeros(2)})["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


@pytest.mark.parametrize("size", [12, 64, 95])
def test_a_short_file_of_another_version_is_refused_by_its_version_not_as_truncated(tmp_path, size):
    # the reading order the specification gives (magic, version, reserved zeros, size): another version may be smaller
    path = tmp_path / "v2.ckpt"
    path.write_bytes((b"\x89FNLCKPT" + (2).to_bytes(4, "little")).ljust(size, b"\0"))
    for read in (read_metadata, lambda p: restore(p, small_target())):
        with raises(path, r"unsupported checkpoint format version 2; this fnlight reads version 1"):
            read(path)


def test_a_torch_save_file_is_not_a_checkpoint(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "t.pt")
    with raises(tmp_path / "t.pt", r"not an fnlight checkpoint: it starts with b'PK\\x03\\x04"):
        restore(tmp_path / "t.pt", {"a": torch.ones(2)})


@settings(max_examples=150, deadline=None)
@given(st.integers(0, len(SMALL) - 1))
def test_every_truncation_raises(damage_dir, length):
    path = damage_dir / "t.ckpt"
    path.write_bytes(SMALL[:length])
    text = "the file is empty" if length == 0 else "truncated"
    with raises(path, text):
        restore(path, small_target())
    with raises(path, text):
        read_metadata(path)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(SMALL) - 1), st.integers(1, 255))
def test_every_single_byte_change_raises(damage_dir, position, xor):
    data = bytearray(SMALL)
    data[position] ^= xor
    path = damage_dir / "f.ckpt"
    path.write_bytes(bytes(data))
    with raises(path, ""):
        restore(path, small_target())


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_garbage_raises(damage_dir, garbage, with_magic):
    path = damage_dir / "g.ckpt"
    path.write_bytes((SMALL[:8] if with_magic else b"") + garbage)
    with raises(path, ""):
        restore(path, small_target())
    with raises(path, ""):
        read_metadata(path)


def small_layout() -> dict[str, tuple[int, int]]:
    """(offset, length) of each tensor in SMALL, and of the index."""
    index_offset, index_length = int.from_bytes(SMALL[-32:-24], "little"), int.from_bytes(SMALL[-24:-16], "little")
    index = decode_index(SMALL[index_offset : index_offset + index_length], index_offset=index_offset, where="x")
    layout = {path_str(e.path): (e.offset, e.length) for e in index.entries if hasattr(e, "offset")}
    return {**layout, "<index>": (index_offset, index_length)}


def test_small_checkpoint_has_padding_between_and_after_tensors():
    layout = small_layout()
    assert layout["flag"] == (64, 1) and layout["h"] == (128, 14) and layout["w"] == (192, 60)
    assert layout["<index>"][0] == 256 and len(SMALL) == 256 + layout["<index>"][1] + 32


@pytest.mark.parametrize(
    ("position", "message"),
    [
        (3, r"not an fnlight checkpoint"),
        (8, r"unsupported checkpoint format version 254; this fnlight reads version 1"),
        (40, r"damaged preamble: its reserved bytes 12-63 must be zero"),
        (64, r"damaged: checksum mismatch in the tensor flag \(stored crc32 0x[0-9a-f]{8}, computed 0x"),
        (200, r"damaged: checksum mismatch in the tensor w"),
        (65, r"non-zero alignment padding at \[65, 128\) before the tensor h"),
        (150, r"non-zero alignment padding at \[142, 192\) before the tensor nothing"),
        (254, r"non-zero alignment padding at \[252, 256\) before the index"),
        (260, r"damaged index: checksum mismatch"),
        (-30, r"damaged footer: checksum mismatch"),
        (-10, r"damaged footer: checksum mismatch"),
        (-1, r"truncated or incomplete: the file does not end with the footer magic"),
    ],
)
def test_a_flip_in_each_region_names_the_problem(tmp_path, position, message):
    data = bytearray(SMALL)
    data[position] ^= 0xFF
    path = tmp_path / "f.ckpt"
    path.write_bytes(bytes(data))
    with raises(path, message):
        restore(path, small_target())


def _crc_workers() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name == "fnlight-crc32"]


@pytest.mark.parametrize("damage", ["flip-first", "flip-last", "truncate"])
def test_large_tensors_are_checked_on_the_worker_thread(tmp_path, damage):
    big = {"a": torch.randn(1 << 18), "b": torch.randn(3, 1 << 17), "small": torch.arange(5)}  # 1 MiB, 1.5 MiB
    big["t"] = torch.randn(1 << 9, 1 << 10).t()  # 2 MiB, not contiguous: staged, checksummed inline
    path = tmp_path / "big.ckpt"
    save(path, big)
    assert not _crc_workers()
    with open(path, "rb", buffering=0) as f:
        stored = {path_str(e.path): e.crc32 for e in ck_io._read_index(f, "here").entries}
    assert stored == {k: zlib.crc32(v.contiguous().numpy().tobytes()) for k, v in big.items()}
    target = {k: torch.empty_like(v) for k, v in big.items()}
    out = restore(path, target)
    assert all(torch.equal(out[k], big[k]) for k in big) and not _crc_workers()
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: 64 + (1 << 20) + 4096]  # inside b: the worker is stopped on the way out
        message = r"file ended|truncated"
    else:
        offset = 64 + 100 if damage == "flip-first" else 64 + (1 << 20) + (3 << 19) - 1
        data[offset] ^= 0x01
        message = r"checksum mismatch in the tensor " + ("a" if damage == "flip-first" else "b")
    path.write_bytes(bytes(data))
    with raises(path, message):
        restore(path, target)
    assert not _crc_workers()


def test_the_checksummer_keeps_each_tensors_crc_apart_whatever_the_chunking(tmp_path, monkeypatch):
    monkeypatch.setattr(ck_stream, "THREAD_MIN", 1)
    monkeypatch.setattr(ck_stream, "IO_CHUNK", 7)  # many chunks per tensor, interleaved with others
    path = tmp_path / "f.ckpt"
    path.write_bytes(SMALL)
    out = restore(path, small_target())
    assert torch.equal(out["w"], SMALL_TREE["w"])
    for position, name in [(64, "flag"), (200, "w")]:
        data = bytearray(SMALL)
        data[position] ^= 0xFF
        path.write_bytes(bytes(data))
        with raises(path, rf"checksum mismatch in the tensor {name}"):
            restore(path, small_target())


# --- damage: hostile indexes (valid checksums, bad content) ------------------------------------

TENSOR = {"path": ["w"], "kind": "tensor", "dtype": "float32", "shape": [4], "offset": 64, "length": 16, "crc32": 0}


def hostile(**changes):
    return index_dict([{**TENSOR, **changes}])


@pytest.mark.parametrize(
    ("index", "data", "message"),
    [
        (hostile(offset=1 << 40), bytes(16), r"w: bytes at \[1099511627776, 1099511627792\) are out of place"),
        (hostile(offset=-64), bytes(16), r"w: offset should be an integer in \[0, 9223372036854775807\], found -64"),
        (hostile(length=1 << 62), bytes(16), r"w: length 4611686018427387904 does not match dtype float32 and shape \[4\]"),
        (hostile(shape=[1 << 40, 1 << 40], length=16), bytes(16), r"w: shape \[1099511627776, 1099511627776\] is too large"),
        (hostile(shape=[2, -2]), bytes(16), r"w: shape entry should be an integer in \[0, "),
        (hostile(shape=[1] * 65), bytes(16), r"w: shape should be a list of at most 64 sizes"),
        (hostile(shape=[True, 4]), bytes(16), r"w: shape entry should be an integer"),
        (hostile(dtype="os.system"), bytes(16), r"w: unknown dtype 'os.system'; expected one of \["),
        (hostile(dtype="Tensor"), bytes(16), r"w: unknown dtype 'Tensor'"),
        (hostile(dtype="qint8"), bytes(16), r"w: unknown dtype 'qint8'"),
        (hostile(crc32=1 << 40), bytes(16), r"w: crc32 should be an integer in \[0, 4294967295\]"),
        (hostile(kind="pickle"), bytes(16), r"w: kind should be 'tensor' or 'value', found 'pickle'"),
        (hostile(path=[1.5]), bytes(16), r"leaf 0: path keys should be strings or integers, found \[1\.5\]"),
        (hostile(path="w"), bytes(16), r"leaf 0: path should be a list of at most 256 keys"),
        (hostile(), bytes(80), r"the tensors end at byte 80, but the index starts at 192"),
        (index_dict([TENSOR, TENSOR]), bytes(16), r"duplicate leaf path w"),
        (index_dict([{"path": ["a"], "kind": "value", "value": [1]}]), b"", r"a: inline value of type list"),
        (index_dict([], version=2), b"", r"unsupported checkpoint format version 2 in the index"),
        (index_dict([], version=True), b"", r"unsupported checkpoint format version True"),
        (index_dict([], format="other"), b"", r"format is 'other', expected 'fnlight.checkpoint'"),
        (index_dict([], alignment=8), b"", r"expected alignment 64 and checksum 'crc32'"),
        ({**index_dict([]), "leaves": {}}, b"", r"leaves should be a list, found dict"),
        (index_dict([], versions={"torch": 2}), b"", r"library versions must be strings"),
        (index_dict([], metadata={"a": [b""]}), b"", r"metadata\['a'\]\[0\] is a bytes"),
        (index_dict([], metadata=[]), b"", r"metadata should be a map, found list"),
        ([1, 2], b"", r"the index should be a map, found list"),
        (b"\x91" * 2000 + b"\xc0", b"", r"not valid msgpack \(StackError"),
        (b"\xdd\xff\xff\xff\xff", b"", r"not valid msgpack \(ValueError: 4294967295 exceeds max_array_len"),
        (b"\xc7\x01\x05a", b"", r"not valid msgpack \(ValueError: \d+ exceeds max_ext_len\(0\)"),
        (b"\xc4\x01a", b"", r"not valid msgpack \(ValueError: 1 exceeds max_bin_len\(0\)"),
        (b"\xa2\xff\xfe", b"", r"not valid msgpack \(UnicodeDecodeError"),
        (b"\x81\x01\x01", b"", r"not valid msgpack \(ValueError: int is not allowed for map key"),
        (b"\xc1", b"", r"not valid msgpack \(FormatError"),
        (b"\xc0\xc0", b"", r"not valid msgpack \(ExtraData"),
        (b"\x92\xc0", b"", r"not valid msgpack \(ValueError: Unpack failed: incomplete input"),
    ],
)
def test_hostile_index_raises_checkpoint_error(tmp_path, index, data, message):
    path = tmp_path / "h.ckpt"
    craft(path, index, data)
    with raises(path, message):
        restore(path, {"w": torch.zeros(4)})


@pytest.mark.parametrize(
    ("offset", "length", "size_delta", "message"),
    [
        (65, 10, 0, r"damaged footer: index at offset 65 with length 10 does not fit"),
        (0, 10, 0, r"index at offset 0 with length 10"),
        (64, 1 << 62, 0, r"index at offset 64 with length 4611686018427387904 does not fit"),
        (64, 0, 0, r"index at offset 64 with length 0"),
        (64, 9, 0, r"index at offset 64 with length 9 does not fit a 106-byte file"),
    ],
)
def test_hostile_footer_raises_checkpoint_error(tmp_path, offset, length, size_delta, message):
    raw = msgpack.packb(index_dict([]))[:10]
    path = tmp_path / "h.ckpt"
    path.write_bytes(preamble() + raw + footer(offset, length, zlib.crc32(raw)))
    with raises(path, message):
        read_metadata(path)


def test_oversized_index_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "h.ckpt"
    length = ck_format.MAX_INDEX_BYTES + 64
    with open(path, "wb") as f:
        f.write(preamble())
        f.seek(64 + length)
        f.write(footer(64, length, 0))  # a sparse file: the index is never really written
    with raises(path, rf"index at offset 64 with length {length} does not fit"):
        read_metadata(path)


def test_index_with_too_many_maps_and_lists_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(ck_format, "MAX_INDEX_CONTAINERS", 50)
    path = tmp_path / "h.ckpt"
    craft(path, index_dict([], metadata={"a": [[] for _ in range(60)]}))
    with raises(path, r"damaged index: more than 50 maps and lists"):
        read_metadata(path)


@pytest.mark.parametrize("limit", ["MAX_INDEX_BYTES", "MAX_INDEX_CONTAINERS"])
def test_save_refuses_an_index_over_the_limits_before_writing(tmp_path, monkeypatch, limit):
    monkeypatch.setattr(ck_format, limit, 5)
    with pytest.raises(ValueError, match=r"the index would take \d+ bytes and \d+ maps and lists; the limits are"):
        save(tmp_path / "x.ckpt", SMALL_TREE)
    assert os.listdir(tmp_path) == []


def test_loading_never_unpickles(tmp_path, monkeypatch):
    _, state = trained_state(1)
    save(tmp_path / "s.ckpt", state)

    def boom(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    monkeypatch.setattr(torch, "load", boom)
    assert fl.tree_equal(restore(tmp_path / "s.ckpt", state), state)


def test_save_refuses_a_tensor_subclass(tmp_path):
    class Tagged(torch.Tensor):
        pass

    with pytest.raises(TypeError, match=r"the leaf at w is a Tagged; save takes plain tensors \(gather a DTensor"):
        fl.checkpoint.save(tmp_path / "t.ckpt", {"w": torch.zeros(2).as_subclass(Tagged)})
    assert not (tmp_path / "t.ckpt").exists()


def test_a_dtype_outside_the_allow_list_is_refused_by_name():
    """Every dtype torch 2.13 has is stored or refused earlier (quantized); a future one must not be written blind."""
    from fnlight.checkpoint._format import DTYPE_NAMES
    from fnlight.checkpoint._leaves import check_tensor

    allowed = {d: n for d, n in DTYPE_NAMES.items() if d is not torch.float16}
    with pytest.raises(TypeError, match=r"the tensor at w\.half has dtype torch\.float16, which checkpoints do not store"):
        check_tensor(torch.zeros(2, dtype=torch.float16), ("w", "half"), allowed)
