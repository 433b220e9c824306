"""Loader: order as a function of (seed, epoch), resuming mid-epoch, workers, errors."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import fnlight as fl
from fnlight.optim import adamw, warmup_cosine


def tensors(n=50):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)


class Squares(Dataset):
    def __len__(self):
        return 23

    def __getitem__(self, i):
        return torch.tensor([float(i)]), torch.tensor(i * i) + torch.randint(0, 1, ())


def test_order_is_a_function_of_seed_and_epoch():
    a = fl.Loader(tensors(), batch_size=8, shuffle=True, seed=1)
    b = fl.Loader(tensors(), batch_size=8, shuffle=True, seed=1)
    torch.manual_seed(123)
    assert torch.equal(a.order(3), b.order(3))
    assert not torch.equal(a.order(3), a.order(4))
    assert not torch.equal(a.order(3), fl.Loader(tensors(), batch_size=8, shuffle=True, seed=2).order(3))
    assert torch.equal(fl.Loader(tensors(), batch_size=8).order(5), torch.arange(50))
    assert sorted(a.order(0).tolist()) == list(range(50))


def test_batches_cover_the_epoch_and_drop_last():
    x, y = tensors(50)
    loader = fl.Loader((x, y), batch_size=8, shuffle=True)
    batches = list(loader.iter_epoch(2))
    assert len(loader) == len(batches) == 7 and len(batches[-1][0]) == 2
    assert torch.equal(torch.cat([b[1] for b in batches]), y[loader.order(2)])
    assert (
        len(list(fl.Loader((x, y), batch_size=8, drop_last=True).iter_epoch(0)))
        == len(fl.Loader((x, y), batch_size=8, drop_last=True))
        == 6
    )


def test_start_skips_without_loading():
    loader = fl.Loader(tensors(), batch_size=8, shuffle=True)
    full = list(loader.iter_epoch(1))
    for start in (0, 3, 7):
        rest = list(loader.iter_epoch(1, start))
        assert len(rest) == 7 - start
        assert all(torch.equal(a[0], b[0]) for a, b in zip(rest, full[start:]))


def test_map_style_dataset_and_workers_agree():
    plain = fl.Loader(Squares(), batch_size=5, shuffle=True, seed=4)
    workers = fl.Loader(Squares(), batch_size=5, shuffle=True, seed=4, num_workers=2)
    a, b = list(plain.iter_epoch(1, 1)), list(workers.iter_epoch(1, 1))
    assert len(a) == len(b) == 4
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))


class Augmented(torch.utils.data.Dataset):
    """Each sample drawn with torch's, Python's and NumPy's global generators (as augmentations are)."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        import random

        import numpy as np

        return torch.tensor([float(i), torch.rand(()).item(), random.random(), float(np.random.rand())])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_augmentations_depend_on_the_batch_not_on_the_batches_before_it(num_workers):
    loader = fl.Loader(Augmented(), batch_size=3, shuffle=True, seed=5, num_workers=num_workers)
    torch_state = torch.get_rng_state()
    full = list(loader.iter_epoch(1))
    for start in (1, 2, 3):  # a resumed epoch draws what the whole epoch drew from that batch on
        assert all(torch.equal(a, b) for a, b in zip(loader.iter_epoch(1, start), full[start:], strict=True)), start
    assert torch.equal(torch.get_rng_state(), torch_state)  # torch's global generator is left as it was
    draws = torch.cat(full)[:, 1:]
    assert len(set(draws.flatten().tolist())) == draws.numel()  # every sample, batch and generator draws anew
    assert not torch.equal(torch.cat(list(loader.iter_epoch(2)))[:, 1:], draws)  # another epoch, other draws
    other = fl.Loader(Augmented(), batch_size=3, shuffle=True, seed=5, num_workers=2 - num_workers)
    assert all(torch.equal(a, b) for a, b in zip(other.iter_epoch(1), full, strict=True))  # workers or not: the same


def mixing_collate(items):
    """A collate_fn that draws (MixUp's mixing weight, CutMix's box)."""
    return torch.stack(items) + torch.rand(())


def test_a_collate_fn_draws_from_the_batchs_seed_in_this_process_as_in_a_worker():
    # in this process the collate_fn ran after the seeded fetch, on the caller's generator: a resumed epoch mixed
    # other weights, workers (which collate in the seeded worker) gave other batches, and torch's generator moved
    plain = fl.Loader(Augmented(), batch_size=3, shuffle=True, seed=5, collate_fn=mixing_collate)
    torch.manual_seed(0)
    torch_state = torch.get_rng_state()
    full = list(plain.iter_epoch(1))
    assert torch.equal(torch.get_rng_state(), torch_state)
    torch.manual_seed(1)
    assert all(torch.equal(a, b) for a, b in zip(plain.iter_epoch(1, 2), full[2:], strict=True))
    workers = fl.Loader(Augmented(), batch_size=3, shuffle=True, seed=5, collate_fn=mixing_collate, num_workers=2)
    assert all(torch.equal(a, b) for a, b in zip(workers.iter_epoch(1), full, strict=True))


def test_a_loader_in_this_process_seeds_only_the_cpu_generator_it_restores(monkeypatch):
    # torch.manual_seed seeds the CUDA generators too (or queues the seed until CUDA starts), which draw()
    # does not restore: iterating a Loader on a GPU machine would have moved the GPU's dropout stream
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(seed))
    batches = list(fl.Loader(Augmented(), batch_size=3, shuffle=True, seed=5).iter_epoch(0))
    assert batches and seeded == []


def test_fold_resumes_mid_epoch_bitwise_with_shuffle_and_dropout():
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))
        return fl.make_train_step(model, fl.losses.cross_entropy, adamw(warmup_cosine(1e-2, 5, 30)))

    loader = fl.Loader(tensors(), batch_size=8, shuffle=True, seed=7)
    step = build()
    whole = fl.fold(step, step.init(seed=1), loader, epochs=3, progress=False)
    part = fl.fold(step, step.init(seed=1), loader, max_steps=10, progress=False)
    assert (int(part.data.epoch), int(part.data.batch)) == (1, 3)
    resumed = fl.fold(build(), part, loader, epochs=3, progress=False)
    assert fl.tree_equal(resumed.params, whole.params) and fl.tree_equal(resumed.opt_state, whole.opt_state)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((tensors(),), {"batch_size": 0}, ValueError, "batch_size must be an int >= 1, got 0"),
        ((tensors(),), {"batch_size": 2, "seed": "a"}, TypeError, "seed must be an int, got 'a'"),
        ((tensors(),), {"batch_size": 2, "seed": 2**64}, ValueError, r"seed must fit in int64, .* got 18446744073709551616"),
        ((tensors(),), {"batch_size": 2, "shuffle": "False"}, TypeError, "shuffle must be a bool, got 'False'"),
        ((tensors(),), {"batch_size": 2, "drop_last": "no"}, TypeError, "drop_last must be a bool, got 'no'"),
        ((tensors(),), {"batch_size": 2, "num_workers": -1}, ValueError, "num_workers must be an int >= 0, got -1"),
        (
            ((torch.zeros(3), torch.zeros(4)),),
            {"batch_size": 2},
            ValueError,
            r"share their first dimension, got lengths \[3, 4\]",
        ),
        ((tensors(),), {"batch_size": 2, "num_workers": 2}, ValueError, "apply to map-style datasets"),
        ((5,), {"batch_size": 2}, TypeError, "dataset must be a tuple of tensors or a map-style dataset"),
    ],
)
def test_bad_options(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        fl.Loader(*args, **kwargs)


def test_bad_start():
    with pytest.raises(ValueError, match=r"start must be an int in \[0, 7\], got 8 \(a resumed state's position"):
        fl.Loader(tensors(), batch_size=8).iter_epoch(0, 8)


@pytest.mark.parametrize(
    ("epoch", "start", "match"),
    [
        (0, 1.5, r"Loader.iter_epoch: start must be an int in \[0, 7\], got 1\.5"),
        (0, True, r"start must be an int in \[0, 7\], got True"),
        (0, None, r"start must be an int in \[0, 7\], got None"),
        (1.5, 0, r"Loader.iter_epoch: epoch must be an int >= 0, got 1\.5"),
        (-1, 0, r"epoch must be an int >= 0, got -1"),
    ],
)
def test_iter_epoch_names_a_position_that_is_not_an_int(epoch, start, match):
    for shuffle in (False, True):  # unshuffled, an epoch of 1.5 was served as any other
        with pytest.raises(ValueError, match=match):
            fl.Loader(tensors(), batch_size=8, shuffle=shuffle).iter_epoch(epoch, start)


def test_ranks_serve_disjoint_shares_of_the_same_order():
    x, y = tensors(51)
    shards = [fl.Loader((x, y), batch_size=8, shuffle=True, seed=4, rank=r, world_size=2) for r in range(2)]
    orders = [s.order(3) for s in shards]
    assert sorted(torch.cat(orders).tolist()) == list(range(51))  # every sample once: no duplicates
    assert [len(o) for o in orders] == [26, 25] and [len(s) for s in shards] == [4, 4]
    served = torch.cat([b[1] for s in shards for b in s.iter_epoch(3)])
    assert sorted(served.tolist()) == sorted(y.tolist())
    single = fl.Loader((x, y), batch_size=8, shuffle=True, seed=4)
    assert torch.equal(single.order(3)[0::2], orders[0])


def test_drop_last_gives_every_rank_the_same_number_of_steps():
    x, y = tensors(51)
    shards = [fl.Loader((x, y), batch_size=8, shuffle=True, rank=r, world_size=2, drop_last=True) for r in range(2)]
    assert [s.shard_size for s in shards] == [25, 25] and [len(s) for s in shards] == [3, 3]
    assert not set(shards[0].order(0).tolist()) & set(shards[1].order(0).tolist())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 2, "world_size": 2}, r"rank must be an int in \[0, 2\), got 2"),
        ({"rank": 0, "world_size": 0}, "world_size must be an int >= 1, got 0"),
    ],
)
def test_bad_rank_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fl.Loader(tensors(), batch_size=2, **kwargs)


def test_fold_refuses_a_loader_whose_ranks_would_take_different_numbers_of_steps():
    x, y = torch.randn(9, 10), torch.zeros(9, dtype=torch.int64)
    step = fl.make_train_step(nn.Linear(10, 3), fl.losses.cross_entropy, adamw(1e-2))
    uneven = fl.Loader((x, y), batch_size=2, rank=0, world_size=2)  # 5 and 4 samples: 3 and 2 batches
    with pytest.raises(ValueError, match=r"the Loader's 9 samples give the 2 ranks 2 to 3 batches per epoch .*drop_last=True"):
        fl.fold(step, step.init(), uneven, progress=False)
    assert [uneven.batches_on(r) for r in range(2)] == [3, 2] and len(uneven) == 3
    with pytest.raises(ValueError, match=r"Loader.batches_on: rank must be an int in \[0, 2\), got 2"):
        uneven.batches_on(2)
    dropped = fl.Loader((x, y), batch_size=2, rank=0, world_size=2, drop_last=True)
    for fine in (dropped, fl.Loader((x, y), batch_size=8, world_size=2, rank=1)):  # one batch on every rank
        assert int(fl.fold(step, step.init(), fine, progress=False).step) == len(fine)


def test_a_dict_or_a_list_of_tensors_is_refused_with_the_tuple_form():
    x, y = torch.randn(100, 3), torch.randint(0, 2, (100,))
    with pytest.raises(TypeError, match=r"Loader: got a mapping keyed by name \(\['x', 'y'\]\).*pass a tuple"):
        fl.Loader({"x": x, "y": y}, batch_size=16)
    with pytest.raises(TypeError, match=r"Loader: got a list of 2 tensors of different shapes.*pass a tuple"):
        fl.Loader([x, y], batch_size=16)
    samples = [torch.full((3,), float(i)) for i in range(10)]  # a list of samples is a dataset
    assert [b.shape for b in fl.Loader(samples, batch_size=4, shuffle=False).iter_epoch(0)] == [(4, 3), (4, 3), (2, 3)]
    ragged = [torch.zeros(i + 1) for i in range(4)]  # samples of different sizes with a collate_fn of their own
    loader = fl.Loader(ragged, batch_size=2, shuffle=False, collate_fn=lambda items: [len(t) for t in items])
    assert list(loader.iter_epoch(0)) == [[1, 2], [3, 4]]


def test_a_resumed_fold_skips_the_consumed_batches_of_a_generator_unless_the_position_is_reset():
    seen = []

    def loss(model, batch):
        seen.append(int(batch[0][0, 0]))
        return fl.losses.mse(model, batch)

    step = fl.make_train_step(torch.nn.Linear(1, 1), loss, fl.optim.sgd(0.1))

    def stream(start=0):
        return ((torch.full((2, 1), float(i)), torch.zeros(2, 1)) for i in range(start, 6))

    stopped = fl.fold(step, step.init(), stream(), epochs=1, max_steps=3, progress=False)
    assert seen == [0, 1, 2] and int(stopped.data.batch) == 3
    seen.clear()
    fl.fold(step, stopped, stream(), epochs=1, progress=False)  # a stream from the epoch's beginning: 3 skipped
    assert seen == [3, 4, 5]
    seen.clear()
    position = fl.DataPosition(epoch=stopped.data.epoch.clone(), batch=torch.zeros_like(stopped.data.batch))
    fl.fold(step, stopped.replace(data=position), stream(start=3), epochs=1, progress=False)  # positioned by itself
    assert seen == [3, 4, 5]


def test_a_resumed_position_past_the_batches_of_a_list_is_refused_as_a_loaders_is():
    # a state 4 batches into epoch 0 resumed on a list of 3 batches: islice skipped the whole epoch without a word
    # and the fold went on to the next one (fl.Loader refused the same position with a ValueError)
    step = fl.make_train_step(torch.nn.Linear(3, 1), fl.losses.mse, fl.optim.sgd(0.1))
    batch = (torch.ones(4, 3), torch.zeros(4, 1))
    stopped = fl.fold(step, step.init(), [batch] * 5, max_steps=4, progress=False)
    match = r"state.data.batch = 4 in epoch 0, is past the data's 3 batches per epoch \(list of length 3\)"
    with pytest.raises(ValueError, match=match):
        fl.fold(step, stopped, [batch] * 3, epochs=2, progress=False)
    with pytest.raises(ValueError, match=match):
        fl.fold(step, stopped, lambda epoch: [batch] * 3, epochs=2, progress=False)
    assert int(fl.fold(step, stopped, [batch] * 4, epochs=2, progress=False).step) == 8  # every batch consumed: next epoch


def test_a_tuple_mixing_tensors_with_other_data_or_holding_a_0d_tensor_is_refused():
    # (x, labels as a NumPy array) was read as a map-style dataset of 2 samples and failed later in collate
    x = torch.randn(100, 3)
    for other in (np.arange(100), list(range(100))):
        with pytest.raises(
            TypeError, match=rf"Loader: a tuple dataset must hold only tensors .* got {type(other).__name__} at position 1"
        ):
            fl.Loader((x, other), batch_size=16)
    with pytest.raises(
        ValueError, match=r"Loader: the dataset's tensors must have a first \(sample\) dimension, got a 0-d tensor at position 1"
    ):
        fl.Loader((x, torch.tensor(1.0)), batch_size=16)
    pairs = tuple((float(i), i) for i in range(5))  # a tuple of samples without tensors is still a dataset
    assert len(fl.Loader(pairs, batch_size=2)) == 3


def test_an_iterable_dataset_is_refused_at_construction():
    # it was accepted (Dataset defines __getitem__) and failed at the first batch with NotImplementedError
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(torch.arange(10.0))

        def __len__(self):
            return 10

    with pytest.raises(TypeError, match=r"Loader: got an IterableDataset \(Stream\), which has no indexed access"):
        fl.Loader(Stream(), batch_size=4)
