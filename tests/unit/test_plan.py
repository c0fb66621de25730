"""Who resumes from what (train/checkpointing/plan.py, train/ckpt/select.py): pure functions over
the ranks' reports, tested without a process group."""

from __future__ import annotations

import pytest

from train.checkpointing.plan import (
    DURABLE,
    LOCAL,
    Copy,
    Failures,
    Foreign,
    Report,
    Role,
    choose,
    readers,
    receivers,
    roles,
)
from train.ckpt import select

FP = "fp"


def copy(step: int, tier: int = DURABLE, node: str = "n0", digest: str = "", **kw: object) -> Copy:
    name = f"step_{step:08d}"
    where = f"/{node}/{'local' if tier == LOCAL else 'checkpoints'}/{name}"
    return Copy(tier, name, step, where, digest or f"d{step}", FP, {"model.safetensors": {"size": 1}}, **kw)  # type: ignore[arg-type]


def report(node: int, *copies: Copy, last: int = 0) -> Report:
    return Report(node, tuple(copies), last)


def test_reports_travel_as_json_and_come_back_equal() -> None:
    r = report(3, copy(10), copy(12, LOCAL, problem="no manifest.json"), last=14)
    assert Report.decode(r.encode()) == r


def test_the_newest_step_on_any_node_wins_and_its_lowest_holder_sends_it() -> None:
    reports = [report(0, copy(10)), report(1, copy(15, node="n1")), report(2, copy(15, node="n2"))]
    plan = choose(reports, set(), FP)
    assert plan is not None and plan.chosen.step == 15 and plan.source == 1
    assert sorted(plan.holders) == [1, 2] and not plan.mixed


def test_equal_steps_prefer_the_durable_tier_of_a_rank() -> None:
    reports = [report(0, copy(20, LOCAL), copy(20, DURABLE))]
    plan = choose(reports, set(), FP)
    assert plan is not None and plan.chosen.tier == DURABLE and plan.holders[0].tier == DURABLE


def test_unusable_and_excluded_copies_are_never_chosen() -> None:
    reports = [report(0, copy(30, problem="no manifest.json"), copy(20), copy(10))]
    plan = choose(reports, {(0, copy(20).location)}, FP)
    assert plan is not None and plan.chosen.step == 10
    assert choose([report(0, copy(5, problem="torn"))], set(), FP) is None
    assert choose([report(0), report(1)], set(), FP) is None


def test_a_foreign_checkpoint_at_least_as_new_is_an_error_an_older_one_is_not() -> None:
    foreign = Copy(DURABLE, "step_00000020", 20, "/n0/checkpoints/step_00000020", "x", "other")
    with pytest.raises(Foreign, match="different model/config"):
        choose([report(0, foreign, copy(20, LOCAL))], set(), FP)
    older = Copy(DURABLE, "step_00000005", 5, "/n0/checkpoints/step_00000005", "x", "other")
    plan = choose([report(0, copy(20), older)], set(), FP)
    assert plan is not None and plan.chosen.step == 20


def test_nodes_holding_another_state_under_the_same_step_are_flagged() -> None:
    reports = [report(0, copy(10, digest="a")), report(1, copy(10, node="n1", digest="b"))]
    plan = choose(reports, set(), FP)
    assert plan is not None and plan.mixed and plan.source == 0 and sorted(plan.holders) == [0]


def kinds(round_roles: list[Role]) -> list[str]:
    return [r.kind if r.kind != "follow" else f"follow {r.leader}" for r in round_roles]


def test_roles_one_rank_a_node_reads_or_receives_the_others_follow_it() -> None:
    # ranks 0,1 on node 0 (rank 0 holds it), ranks 2,3 on node 1 (holding nothing)
    reports = [report(0, copy(10)), report(0), report(1), report(1)]
    plan = choose(reports, set(), FP)
    assert plan is not None
    assert kinds(roles(plan, reports, shared=False, forced=set())) == [
        "own",
        "follow 0",
        "receive",
        "follow 2",
    ]
    # a shared directory: node 1's leader reads the durable copy, once for its node
    assert kinds(roles(plan, reports, shared=True, forced=set())) == ["own", "follow 0", "copy", "follow 2"]
    # a node whose rank failed to read another's copy receives from now on
    assert kinds(roles(plan, reports, shared=True, forced={2})) == ["own", "follow 0", "receive", "follow 2"]
    # the node's holder leads it, whatever its rank
    reports = [report(0), report(0, copy(10)), report(0), report(0)]
    plan = choose(reports, set(), FP)
    assert plan is not None
    assert kinds(roles(plan, reports, shared=True, forced=set())) == [
        "follow 1",
        "own",
        "follow 1",
        "follow 1",
    ]


def test_eight_ranks_a_node_read_one_copy_a_node() -> None:
    reports = [
        report(node, *([copy(10, node=f"n{node}")] if rank % 8 == 0 else []))
        for node in range(3)
        for rank in range(node * 8, node * 8 + 8)
    ]
    plan = choose(reports, set(), FP)
    assert plan is not None
    for shared in (True, False):
        round_roles = roles(plan, reports, shared=shared, forced=set())
        assert readers(round_roles) == [0, 8, 16] and receivers(round_roles) == []


def test_a_node_local_copy_is_never_read_by_another_node() -> None:
    reports = [report(0, copy(10, LOCAL)), report(1)]
    plan = choose(reports, set(), FP)
    assert plan is not None
    assert [r.kind for r in roles(plan, reports, shared=True, forced=set())] == ["own", "receive"]


def test_failures_drop_the_bad_copy_force_receivers_and_retry_transfers() -> None:
    reports = [report(0, copy(10), copy(5)), report(0), report(1)]
    plan = choose(reports, set(), FP)
    assert plan is not None
    round_roles = [Role("own", plan.holders[0]), Role("copy", plan.holders[0]), Role("receive")]
    failures = Failures()
    # only the receiver failed, the sender verified: no copy dropped, the transfer is tried again
    assert failures.add(plan, round_roles, ["", "", "checksum mismatch as received"]) == []
    assert failures.transfers == 1 and not failures.excluded
    # only a follower failed: the same
    assert failures.add(plan, [round_roles[0], Role("follow", leader=0)], ["", "checksum mismatch"]) == []
    assert failures.transfers == 2 and not failures.excluded
    failures.transfers = 0
    # the copier failed: it receives next time
    failures.add(plan, round_roles, ["", "EIO", ""])
    assert failures.forced == {1}
    # the holder's own copy failed: dropped, so the next round takes the older step
    dropped = failures.add(plan, round_roles, ["checksum mismatch", "", ""])
    assert dropped == [(plan.chosen.location, "checksum mismatch")] and failures.skipped == ["step_00000010"]
    again = choose(reports, failures.excluded, FP)
    assert again is not None and again.chosen.step == 5


def test_the_library_applies_the_same_rule() -> None:
    listed = [
        select.Listed(10, 0, 1, "local/10"),
        select.Listed(10, 0, 0, "durable/10"),
        select.Listed(12, 0, 0, "durable/12", usable=False),
    ]
    assert select.newest(listed) == listed[1]
    assert select.newest(listed, {(0, "durable/10")}) == listed[0]
    with pytest.raises(select.Incompatible):
        select.newest([*listed, select.Listed(11, 0, 0, "durable/11", compatible=False)])
