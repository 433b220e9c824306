"""TrainState as a pytree (optree and torch.utils._pytree), replace(), and the tree helpers."""

import dataclasses

import numpy as np
import optree
import pytest
import torch
import torch.utils._pytree as torch_pytree

import fnlight as fl
from fnlight.optim import adamw
from tests.conftest import make_bn_mlp


@pytest.fixture
def state():
    return fl.make_train_step(make_bn_mlp(), fl.losses.cross_entropy, adamw(1e-2)).init(seed=4)


def test_state_is_frozen_and_replace_returns_a_copy(state):
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.step = torch.tensor(3)
    new = state.replace(step=torch.tensor(3))
    assert int(new.step) == 3 and int(state.step) == 0 and new.skeleton is state.skeleton


def test_replace_rejects_unknown_fields(state):
    with pytest.raises(TypeError, match=r"unknown field\(s\) \['steps'\]; expected some of"):
        state.replace(steps=1)


def test_with_slot_adds_a_named_slot(state):
    new = state.with_slot("accum", {"count": torch.tensor(0)})
    assert "accum" in new.slots and state.slots == {}


@pytest.mark.parametrize("name", [None, "", 3])
def test_with_slot_refuses_a_name_that_is_not_a_string(state, name):
    # with_slot(t.slot, ...) for a slotless transform (with_amp in bfloat16: slot None) made a None key, which
    # trained but failed at the next checkpoint save
    with pytest.raises(TypeError, match=rf"TrainState.with_slot: name must be a non-empty string .*got {name!r}"):
        state.with_slot(name, {"count": torch.tensor(0)})


@pytest.mark.parametrize("flatten", ["optree", "torch"])
def test_round_trips_through_both_pytree_registries(state, flatten):
    if flatten == "optree":
        leaves, spec = optree.tree_flatten(state, namespace="fnlight")
        rebuilt = optree.tree_unflatten(spec, leaves)
    else:
        leaves, spec = torch_pytree.tree_flatten(state)
        rebuilt = torch_pytree.tree_unflatten(leaves, spec)
    assert all(isinstance(x, torch.Tensor) for x in leaves)
    assert rebuilt.skeleton is state.skeleton
    assert fl.tree_equal(rebuilt, state)


def test_static_skeleton_is_not_a_leaf(state):
    leaves = optree.tree_leaves(state, namespace="fnlight")
    assert not any(isinstance(x, torch.nn.Module) for x in leaves)
    n = len(state.params) + len(state.buffers)
    assert len(leaves) > n


def test_key_material_and_position_defaults(state):
    assert int(state.key) == 4 and state.key.dtype == torch.int64
    assert (int(state.data.epoch), int(state.data.batch)) == (0, 0)
    assert state.stop.dtype == torch.bool and not bool(state.stop)


def test_tree_equal_detects_differences(state):
    other = fl.tree_clone(state)
    assert fl.tree_equal(state, other)
    other.params["0.weight"][0, 0] += 1
    assert not fl.tree_equal(state, other)
    assert not fl.tree_equal({"a": torch.zeros(2)}, {"a": torch.zeros(2, dtype=torch.float64)})
    nan = torch.tensor([float("nan"), 1.0])
    assert fl.tree_equal({"a": nan, "b": float("nan")}, {"a": nan.clone(), "b": float("nan")})  # NaN equals NaN
    assert not fl.tree_equal({"a": nan}, {"a": torch.tensor([float("nan"), 2.0])})
    assert not fl.tree_equal({"a": nan}, {"a": torch.tensor([0.0, 1.0])})
    assert not fl.tree_equal({"a": torch.zeros(2)}, {"b": torch.zeros(2)})
    assert not fl.tree_equal({"a": 1}, {"a": torch.ones(())})


def test_derive_seed_is_a_pure_mix():
    assert fl.derive_seed(1, 2, 3) == fl.derive_seed(1, 2, 3)
    assert len({fl.derive_seed(0, s) for s in range(1000)}) == 1000
    assert fl.derive_seed(1, 2, 3) != fl.derive_seed(1, 3, 2)
    assert 0 <= fl.derive_seed(-5, 2**70) < 2**63


def test_derive_seed_reads_the_states_tensors_as_the_ints_they_hold():
    key, step = torch.tensor(7), torch.tensor(3)  # state.key and state.step: 0-d int64 tensors
    seed = fl.derive_seed(key, step, 0)
    assert type(seed) is int and seed == fl.derive_seed(7, 3, 0)  # was a tensor mixed with wrapping int64 arithmetic
    assert fl.derive_seed(np.int64(7), 3) == fl.derive_seed(7, 3)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (3.0, r"derive_seed: counter 0 must be an int \(or a 0-d integer tensor\), got 3\.0"),
        (True, r"counter 0 must be an int .*got True"),
        (torch.tensor(1.0), r"counter 0 must be an int .*got a tensor of shape \(\) and dtype torch\.float32"),
        (torch.tensor([1, 2]), r"counter 0 must be an int .*got a tensor of shape \(2,\)"),
    ],
)
def test_derive_seed_refuses_what_is_not_an_integer(bad, match):
    with pytest.raises(TypeError, match=match):
        fl.derive_seed(1, bad)
    with pytest.raises(TypeError, match=match.replace("counter 0", "seed")):
        fl.derive_seed(bad)
