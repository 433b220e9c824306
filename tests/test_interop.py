"""Back to torch: to_module, state_dict, copy_into_module_, load_state_dict."""

import pytest
import torch
from torch import nn

import fnlight as fl
from fnlight.optim import adamw
from tests.conftest import make_batches, make_bn_mlp


@pytest.fixture
def trained():
    step = fl.make_train_step(make_bn_mlp(), fl.losses.cross_entropy, adamw(1e-2))
    return fl.fold(step, step.init(), make_batches(), progress=False)


def test_to_module_reproduces_the_eval_step(trained):
    module = fl.to_module(trained)
    x, y = make_batches(1, seed=5)[0]
    assert not module.training
    expected = fl.make_eval_step(fl.losses.cross_entropy)(trained, (x, y))["loss"]
    assert torch.equal(torch.nn.functional.cross_entropy(module(x), y), expected)
    module[0].weight.data.add_(1)
    assert not torch.equal(module[0].weight, trained.params["0.weight"])


def test_state_dict_matches_module_layout_and_copies(trained):
    sd = fl.state_dict(trained)
    assert list(sd) == list(make_bn_mlp().state_dict())
    sd["0.weight"].add_(1)
    assert not torch.equal(sd["0.weight"], trained.params["0.weight"])


def test_copy_into_module_in_place(trained):
    module = make_bn_mlp(seed=9)
    assert fl.copy_into_module_(trained, module) is module
    for name, p in module.named_parameters():
        assert torch.equal(p.detach(), trained.params[name])
    with pytest.raises(RuntimeError, match="Missing key"):
        fl.copy_into_module_(trained, nn.Linear(10, 3))
    with pytest.raises(TypeError, match="copy_into_module_: module must be a torch.nn.Module, got dict"):
        fl.copy_into_module_(trained, {})


def test_load_state_dict_builds_params_from_pretrained(trained):
    fresh = fl.make_train_step(make_bn_mlp(seed=3), fl.losses.cross_entropy, adamw(1e-2)).init()
    loaded = fl.load_state_dict(fresh, fl.state_dict(trained))
    assert fl.tree_equal(loaded.params, trained.params) and fl.tree_equal(loaded.buffers, trained.buffers)
    assert fl.tree_equal(loaded.opt_state, fresh.opt_state)
    assert not fl.tree_equal(fresh.params, trained.params)


def test_load_state_dict_casts_to_the_leaf_dtype(trained):
    sd = {k: v.double() if v.is_floating_point() else v for k, v in fl.state_dict(trained).items()}
    loaded = fl.load_state_dict(trained, sd)
    assert loaded.params["0.weight"].dtype == torch.float32


def test_load_state_dict_lists_every_mismatch(trained):
    sd = fl.state_dict(trained)
    del sd["0.bias"]
    sd["extra"] = torch.zeros(1)
    sd["3.weight"] = torch.zeros(2, 2)
    with pytest.raises(
        ValueError,
        match=r"missing \['0.bias'\]; unexpected \['extra'\]; mis-shaped \['3.weight: expected \[3, 32\], got \[2, 2\]'\]",
    ):
        fl.load_state_dict(trained, sd)
    partial = fl.state_dict(trained)
    del partial["0.bias"]
    assert torch.equal(fl.load_state_dict(trained, partial, strict=False).params["0.bias"], trained.params["0.bias"])
    with pytest.raises(TypeError, match="source must be a mapping"):
        fl.load_state_dict(trained, [1])
    with pytest.raises(TypeError, match="load_state_dict: strict must be a bool, got 'no'"):
        fl.load_state_dict(trained, partial, strict="no")


class Tied(nn.Module):
    """A language-model head tied to the embedding, and a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)

    def forward(self, tokens):
        return self.head(self.mid(self.embed(tokens)) * self.scale)


def trained_tied():
    torch.manual_seed(0)
    step = fl.make_train_step(Tied(), fl.losses.classification, adamw(1e-2))
    tokens = torch.randint(0, 7, (6,), generator=torch.Generator().manual_seed(1))
    return fl.fold(step, step.init(), [(tokens, tokens.roll(1))] * 3, progress=False)


def test_state_dict_has_the_modules_keys_with_tied_weights_and_without_non_persistent_buffers(tmp_path):
    state = trained_tied()
    assert list(state.params) == ["embed.weight", "mid.weight", "mid.bias"] and "scale" in state.buffers
    sd = fl.state_dict(state)
    assert list(sd) == list(Tied().state_dict()) == ["embed.weight", "mid.weight", "mid.bias", "head.weight"]
    assert torch.equal(sd["head.weight"], state.params["embed.weight"]) and torch.equal(sd["embed.weight"], sd["head.weight"])
    module = fl.copy_into_module_(state, Tied())  # strict
    assert module.head.weight is module.embed.weight and torch.equal(module.head.weight, state.params["embed.weight"])
    x = torch.arange(7)
    assert torch.equal(module.eval()(x), fl.apply(state, x))
    safetensors = pytest.importorskip("safetensors.torch")
    fl.save_safetensors(state, tmp_path / "tied.safetensors")
    again = Tied()
    again.load_state_dict(safetensors.load_file(str(tmp_path / "tied.safetensors")))  # strict, as recipes.md says
    assert torch.equal(again.head.weight, state.params["embed.weight"])


def test_load_state_dict_takes_a_tied_modules_own_state_dict():
    state = trained_tied()
    source = Tied()
    with torch.no_grad():
        source.scale.fill_(5.0)  # not in its state_dict: the state's value stays
    new = fl.load_state_dict(state, source.state_dict())  # strict: aliases expected, non-persistent buffers not
    assert torch.equal(new.params["embed.weight"], source.embed.weight) and torch.equal(new.params["mid.bias"], source.mid.bias)
    assert torch.equal(new.buffers["scale"], torch.full((4,), 2.0))
    partial = {k: v for k, v in source.state_dict().items() if k != "head.weight"}
    with pytest.raises(ValueError, match=r"missing \['head\.weight'\]"):
        fl.load_state_dict(state, partial)
    assert torch.equal(fl.load_state_dict(state, partial, strict=False).params["embed.weight"], source.embed.weight)
    alias_only = {k: v for k, v in source.state_dict().items() if k != "embed.weight"}
    assert torch.equal(fl.load_state_dict(state, alias_only, strict=False).params["embed.weight"], source.embed.weight)
    with pytest.raises(ValueError, match=r"mis-shaped \['head\.weight: expected \[7, 4\], got \[3\]'\]"):
        fl.load_state_dict(state, {**source.state_dict(), "head.weight": torch.zeros(3)})


def test_interop_rejects_non_states():
    for fn in (fl.to_module, fl.state_dict):
        with pytest.raises(TypeError, match="expected a fnlight.TrainState, got int"):
            fn(1)
    with pytest.raises(TypeError, match="copy_into_module_: expected a fnlight.TrainState, got Linear"):
        fl.copy_into_module_(nn.Linear(2, 1), nn.Linear(2, 1))


def test_safetensors_round_trip(trained, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    fl.save_safetensors(trained, tmp_path / "m.safetensors", metadata={"note": "x"})
    loaded = safetensors.load_file(str(tmp_path / "m.safetensors"))
    assert fl.tree_equal(loaded, fl.state_dict(trained))
    rebuilt = fl.load_state_dict(fl.make_train_step(make_bn_mlp(seed=4), fl.losses.cross_entropy, adamw(1e-2)).init(), loaded)
    assert fl.tree_equal(rebuilt.params, trained.params)


def test_safetensors_missing_package_is_named(trained, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("safetensors"):
            raise ImportError("no safetensors")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="save_safetensors needs the safetensors package: pip install safetensors"):
        fl.save_safetensors(trained, tmp_path / "m.safetensors")


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((nn.Linear(2, 1), "m.safetensors"), {}, TypeError, r"save_safetensors: expected a fnlight.TrainState, got Linear"),
        ((None, 3), {}, TypeError, r"save_safetensors: path must be a str or os.PathLike, got int"),
        ((None, "missing/m.safetensors"), {}, FileNotFoundError, r"save_safetensors: the directory .*missing' of path does not"),
        ((None, "."), {}, IsADirectoryError, r"save_safetensors: path must name a file, got the directory"),
        ((None, "m.safetensors"), {"metadata": {"epoch": 3}}, TypeError, r"save_safetensors: metadata must be None or a dict"),
    ],
)
def test_safetensors_arguments_are_checked_where_given(trained, tmp_path, monkeypatch, args, kwargs, error, match):
    monkeypatch.chdir(tmp_path)
    model, path = args
    with pytest.raises(error, match=match):
        fl.save_safetensors(trained if model is None else model, path, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_apply_runs_the_model_with_the_state_tensors_without_copying_or_mutating():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    state = fl.make_train_step(model, fl.losses.mse, fl.optim.sgd(0.1)).init()
    x = torch.randn(5, 3, requires_grad=True)
    out = fl.apply(state, x)
    assert torch.equal(out, fl.to_module(state)(x))  # eval mode by default
    out.sum().backward()  # gradients reach the inputs (a GAN's generator through a fixed discriminator)
    assert x.grad is not None and all(not p.requires_grad for p in state.params.values())
    before = fl.tree_clone(state.buffers)
    train_out = fl.apply(state, x, training=True)  # batch statistics; BatchNorm's running stats are discarded
    assert not torch.allclose(train_out, out)
    assert fl.tree_equal(state.buffers, before)
    with pytest.raises(TypeError, match="apply: training must be a bool, got 1"):
        fl.apply(state, x, training=1)
    with pytest.raises(TypeError, match="apply: expected a fnlight.TrainState, got Linear"):
        fl.apply(nn.Linear(2, 1), x)


def test_progress_shows_the_mean_of_a_per_replica_loss():
    from fnlight._progress import _show

    assert (_show(None), _show(torch.tensor(0.5)), _show(torch.tensor([1.0, 3.0]))) == ("-", "0.5", "2 (mean of 2)")


def test_to_module_after_training_a_spectral_norm_model():
    # spectral_norm's hook leaves `weight` (a tensor with the step's graph) on the skeleton, which deepcopy refuses
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.spectral_norm(nn.Linear(4, 8)), nn.ReLU(), nn.Linear(8, 1))
    step = fl.make_train_step(model, fl.losses.mse, adamw(1e-2))
    state, _ = step(step.init(), (torch.randn(16, 4), torch.randn(16, 1)))
    module = fl.to_module(state)
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert torch.equal(module(x), fl.apply(state, x))
