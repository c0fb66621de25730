"""train.sampler: batch planning and the global, world-size-independent sample order."""

from __future__ import annotations

from collections import Counter

import pytest

from train.errors import ConfigError, IncompatibleCheckpointError
from train.sampler import BatchPlan, GlobalSampler, plan_batches

GLOBAL = 24


def step_samples(sampler: GlobalSampler, plan: BatchPlan) -> dict[int, int]:
    """{global position: sample} for the step at the sampler's cursor, gathered from every rank.

    Position of (micro-batch m, rank r, slot j) is cursor + m*world*micro + r*micro + j.
    """
    out: dict[int, int] = {}
    for rank in range(plan.world_size):
        micro_batches = sampler.step_indices(plan, rank)
        assert len(micro_batches) == plan.accum_steps
        for m, batch in enumerate(micro_batches):
            assert len(batch) == plan.micro_batch_size
            for j, sample in enumerate(batch):
                micro = plan.micro_batch_size
                pos = sampler.cursor + m * plan.world_size * micro + rank * micro + j
                assert pos not in out, f"position {pos} served twice"
                out[pos] = sample
    return out


def run_steps(num_samples: int, seed: int, plan: BatchPlan, steps: int) -> list[dict[int, int]]:
    sampler = GlobalSampler(num_samples, seed)
    per_step = []
    for _ in range(steps):
        per_step.append(step_samples(sampler, plan))
        sampler.advance(plan)
    return per_step


# -- plan_batches ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "world,micro,expect_micro,expect_accum",
    [
        (1, None, 24, 1),
        (2, None, 12, 1),
        (3, None, 8, 1),
        (4, None, 6, 1),
        (1, 6, 6, 4),
        (2, 6, 6, 2),
        (3, 4, 4, 2),
        (4, 2, 2, 3),
        (4, 6, 6, 1),
        (1, 1, 1, 24),
    ],
)
def test_plan_batches(world, micro, expect_micro, expect_accum):
    plan = plan_batches(GLOBAL, world, micro)
    assert plan.world_size == world
    assert plan.micro_batch_size == expect_micro
    assert plan.accum_steps == expect_accum
    assert plan.global_batch_size == GLOBAL


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_plan_keeps_the_global_batch_for_every_world_size(world):
    assert plan_batches(GLOBAL, world, None).global_batch_size == GLOBAL
    assert plan_batches(GLOBAL, world, 2).global_batch_size == GLOBAL


def test_global_batch_not_divisible_by_world_size():
    with pytest.raises(ConfigError) as info:
        plan_batches(10, 4, None)
    message = str(info.value)
    assert "\n" not in message
    assert "--global-batch-size 10" in message
    assert "world size 4" in message


@pytest.mark.parametrize("world,micro", [(2, 5), (4, 4), (3, 3), (1, 7)])
def test_micro_batch_not_dividing_the_per_rank_batch(world, micro):
    with pytest.raises(ConfigError) as info:
        plan_batches(GLOBAL, world, micro)
    message = str(info.value)
    assert "\n" not in message
    assert f"--micro-batch-size {micro}" in message
    assert str(GLOBAL // world) in message  # names the per-rank batch it must divide


def test_micro_batch_larger_than_per_rank_batch():
    with pytest.raises(ConfigError, match="--micro-batch-size 16"):
        plan_batches(GLOBAL, 2, 16)


# -- GlobalSampler: coverage ----------------------------------------------------------------------


def test_empty_dataset_is_a_config_error():
    with pytest.raises(ConfigError):
        GlobalSampler(0, seed=1)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("micro", [None, 2])
def test_one_epoch_serves_every_sample_exactly_once(world, micro):
    num_samples = GLOBAL * 5
    plan = plan_batches(GLOBAL, world, micro)
    served = Counter()
    positions = set()
    for step in run_steps(num_samples, seed=3, plan=plan, steps=5):
        served.update(step.values())
        positions.update(step)
    assert positions == set(range(num_samples))
    assert sorted(served) == list(range(num_samples))
    assert set(served.values()) == {1}, "a sample was repeated"


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("micro", [None, 2])
def test_epochs_are_permutations_across_a_ragged_boundary(world, micro):
    num_samples = 50  # not a multiple of 24: steps straddle epoch boundaries
    plan = plan_batches(GLOBAL, world, micro)
    steps = 9  # 216 positions: four full epochs and part of a fifth
    served: dict[int, int] = {}
    for step in run_steps(num_samples, seed=11, plan=plan, steps=steps):
        assert not served.keys() & step.keys()
        served.update(step)
    assert set(served) == set(range(steps * GLOBAL)), "positions skipped or repeated"
    full_epochs = steps * GLOBAL // num_samples
    assert full_epochs == 4
    for epoch in range(full_epochs):
        block = [served[p] for p in range(epoch * num_samples, (epoch + 1) * num_samples)]
        assert sorted(block) == list(range(num_samples)), f"epoch {epoch} is not a permutation"
    partial = [served[p] for p in range(full_epochs * num_samples, steps * GLOBAL)]
    assert len(set(partial)) == len(partial), "the partial epoch repeats a sample"
    # Consecutive epochs are shuffled differently.
    first = [served[p] for p in range(num_samples)]
    second = [served[p] for p in range(num_samples, 2 * num_samples)]
    assert first != second


def test_single_sample_dataset():
    plan = plan_batches(4, 2, None)
    sampler = GlobalSampler(1, seed=0)
    assert sampler.step_indices(plan, 0) == [[0, 0]]
    assert sampler.step_indices(plan, 1) == [[0, 0]]


# -- GlobalSampler: world-size independence, determinism ----------------------------------------


def test_same_samples_per_step_for_every_world_size():
    num_samples = 100
    steps = 8
    layouts = [(1, None), (2, None), (3, None), (4, None), (1, 4), (2, 3), (3, 2), (4, 1)]
    reference = run_steps(num_samples, seed=5, plan=plan_batches(GLOBAL, 1, None), steps=steps)
    for world, micro in layouts:
        got = run_steps(num_samples, seed=5, plan=plan_batches(GLOBAL, world, micro), steps=steps)
        for step in range(steps):
            assert Counter(got[step].values()) == Counter(reference[step].values()), (world, micro, step)
            # Stronger: every position maps to the same sample, whatever the layout.
            assert got[step] == reference[step], (world, micro, step)


def test_cursor_counts_samples_so_a_world_size_change_continues_the_stream():
    num_samples = 70
    steps = 6
    reference = run_steps(num_samples, seed=2, plan=plan_batches(GLOBAL, 4, None), steps=steps)
    # Three steps at world size 4, then resume at world size 3 from the saved state.
    sampler = GlobalSampler(num_samples, seed=2)
    four = plan_batches(GLOBAL, 4, None)
    for _ in range(3):
        sampler.advance(four)
    resumed = GlobalSampler(num_samples, seed=2)
    resumed.load_state_dict(sampler.state_dict())
    three = plan_batches(GLOBAL, 3, None)
    for step in range(3, steps):
        assert step_samples(resumed, three) == reference[step]
        resumed.advance(three)


def test_deterministic_for_seed_and_step():
    plan = plan_batches(GLOBAL, 2, 4)
    a = run_steps(97, seed=42, plan=plan, steps=10)
    b = run_steps(97, seed=42, plan=plan, steps=10)
    assert a == b
    # Jumping straight to a step (cursor) gives what stepping there gave.
    jumper = GlobalSampler(97, seed=42)
    jumper.cursor = 7 * plan.global_batch_size
    assert step_samples(jumper, plan) == a[7]
    # Indices do not depend on call order or on an earlier lookup of another epoch.
    fresh = GlobalSampler(97, seed=42)
    fresh.sample_at(5000)
    fresh.cursor = 7 * plan.global_batch_size
    assert step_samples(fresh, plan) == a[7]


def test_step_indices_does_not_move_the_cursor():
    plan = plan_batches(GLOBAL, 2, None)
    sampler = GlobalSampler(100, seed=1)
    first = sampler.step_indices(plan, 0)
    assert sampler.step_indices(plan, 0) == first
    assert sampler.cursor == 0
    sampler.advance(plan)
    assert sampler.cursor == GLOBAL
    assert sampler.step_indices(plan, 0) != first


def test_different_seeds_give_different_orders():
    plan = plan_batches(GLOBAL, 1, None)
    orders = {tuple(run_steps(200, seed=s, plan=plan, steps=2)[0].values()) for s in range(5)}
    assert len(orders) == 5


def test_order_is_shuffled():
    sampler = GlobalSampler(100, seed=0)
    order = [sampler.sample_at(p) for p in range(100)]
    assert sorted(order) == list(range(100))
    assert order != list(range(100))


# -- GlobalSampler: state ----------------------------------------------------------------------


def test_state_dict_round_trip_gives_the_same_next_indices():
    plan = plan_batches(GLOBAL, 2, 3)
    sampler = GlobalSampler(61, seed=9)
    for _ in range(4):
        sampler.advance(plan)
    state = sampler.state_dict()
    assert state == {"cursor": 4 * GLOBAL, "seed": 9, "num_samples": 61}

    restored = GlobalSampler(61, seed=9)
    restored.load_state_dict(dict(state))
    assert restored.cursor == sampler.cursor
    for _ in range(5):  # including across an epoch boundary
        for rank in range(plan.world_size):
            assert restored.step_indices(plan, rank) == sampler.step_indices(plan, rank)
        restored.advance(plan)
        sampler.advance(plan)


def test_state_dict_survives_torch_save_weights_only(tmp_path):
    import torch

    sampler = GlobalSampler(61, seed=9)
    sampler.advance(plan_batches(GLOBAL, 1, None))
    path = tmp_path / "sampler.pt"
    torch.save(sampler.state_dict(), path)
    restored = GlobalSampler(61, seed=9)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.cursor == GLOBAL


@pytest.mark.parametrize("seed,num_samples", [(10, 61), (9, 60)])
def test_load_with_mismatched_seed_or_dataset_is_incompatible(seed, num_samples):
    saved = GlobalSampler(61, seed=9)
    saved.cursor = 48
    other = GlobalSampler(num_samples, seed=seed)
    with pytest.raises(IncompatibleCheckpointError) as info:
        other.load_state_dict(saved.state_dict())
    message = str(info.value)
    assert "\n" not in message
    assert "--seed" in message
    assert other.cursor == 0, "a rejected state must not be half-applied"
