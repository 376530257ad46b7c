"""The rollout state machine (reconcile/rollout.py), step by step over live children: a new revision comes up
beside the serving one, the routers switch only when both its pools are ready, the old slot goes once no router
selects it; the same live state always gives the same step (an operator restarted mid-rollout goes on), and a
rollout that cannot fit the accelerator budget says so and leaves the serving revision alone."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from disagg.api.validate import validate_service
from disagg.catalog.accelerators import DEFAULT_CATALOG
from disagg.reconcile import ChildKey, child_key, plan_children, stamp
from disagg.reconcile.rollout import plan_in_place, plan_rollout
from disagg.render import Owner, Placement, place, render_unplaced, revision_of
from disagg.render.revision import ANY_REVISION
from support.paths import REPO

BODY = yaml.safe_load((REPO / "examples" / "01-vllm-nixl-llama70b.yaml").read_text())
NAME, UID = "llama-70b", "uid-1"
KINDS = {"prefill": ("apps/v1", "Deployment"), "decode": ("apps/v1", "Deployment")}
A = {role: ("apps/v1", "Deployment", f"{NAME}-{role}") for role in ("prefill", "decode")}
B = {role: ("apps/v1", "Deployment", f"{NAME}--{role}-b") for role in ("prefill", "decode")}
ROUTER: ChildKey = ("apps/v1", "Deployment", f"{NAME}-router")


def body_with(**model: Any) -> dict[str, Any]:
    out: dict[str, Any] = copy.deepcopy(BODY)
    out["spec"]["model"].update(model)
    return out


def render(body: dict[str, Any]) -> tuple[Any, str, list[dict[str, Any]]]:
    spec = validate_service(body, DEFAULT_CATALOG)
    docs = render_unplaced(Owner(NAME, "serving", UID), spec, DEFAULT_CATALOG)
    return spec, revision_of(docs), docs


def running(docs: list[dict[str, Any]], placement: Placement, *, ready: bool = True, size: int = 2,
            terminating_routers: int = 0) -> dict[ChildKey, dict[str, Any]]:
    """The placed children as the API server would show them: pools of `size` (ready or not), the router rolled
    out (with `terminating_routers` old pods still finishing their streams)."""
    live = {}
    for doc in place(NAME, docs, placement):
        obj = copy.deepcopy(stamp(doc))
        if obj["kind"] == "Deployment":
            role = obj["metadata"]["labels"]["disagg.dev/role"]
            replicas = obj["spec"].setdefault("replicas", size)
            up = replicas if ready or role == "router" else 0
            obj["metadata"]["generation"] = 1
            obj["status"] = {"observedGeneration": 1, "replicas": replicas, "readyReplicas": up, "updatedReplicas": up,
                             "terminatingReplicas": terminating_routers if role == "router" else 0}
        live[child_key(obj)] = obj
    return live


def router_revision(live: dict[ChildKey, dict[str, Any]]) -> str:
    return str(live[ROUTER]["metadata"]["labels"]["disagg.dev/revision"])


def desired(docs: list[dict[str, Any]], placement: Placement) -> dict[ChildKey, dict[str, Any]]:
    return {child_key(m): m for m in place(NAME, docs, placement)}


def test_a_new_service_starts_in_slot_a_on_its_own_revision() -> None:
    spec, rev, _ = render(BODY)
    plan = plan_rollout(NAME, spec, rev, {}, KINDS)
    assert (plan.placement, plan.phase, plan.keep, plan.serving_revision) == (Placement("a"), "Complete",
                                                                            frozenset(), rev)


def test_a_revision_change_steps_through_start_switch_drain_and_complete() -> None:
    _, old_rev, old_docs = render(BODY)
    spec, new_rev, new_docs = render(body_with(revision="v2"))
    live = running(old_docs, Placement("a"), size=5)  # the autoscaler had the pools at 5

    # 1. the new revision comes up in slot b at the serving size; the routers and serving pools stay as they are
    plan = plan_rollout(NAME, spec, new_rev, live, KINDS)
    assert (plan.phase, plan.serving_revision, plan.target) == ("Starting", old_rev, new_rev)
    assert plan.placement == Placement("b", router_revision=old_rev, initial_replicas=(("decode", 5), ("prefill", 5)))
    assert plan.keep == frozenset(A.values())
    wanted = desired(new_docs, plan.placement)
    assert wanted[ROUTER]["spec"]["template"] == live[ROUTER]["spec"]["template"], "the routers must not move yet"
    assert set(B.values()) <= set(wanted) and not set(A.values()) & set(wanted)
    steps = plan_children([stamp(m) for m in wanted.values()], live, UID, keep=plan.keep)
    assert steps.delete == [] and {child_key(m) for m in steps.create} == set(B.values())

    # 2. one new pool ready, the other not: still Starting, and the same step when asked again (a restart)
    both = {**live, **running(new_docs, Placement("b", router_revision=old_rev), ready=False, size=5)}
    both[ROUTER] = live[ROUTER]
    both[B["prefill"]]["status"]["readyReplicas"] = both[B["prefill"]]["status"]["updatedReplicas"] = 5
    again = plan_rollout(NAME, spec, new_rev, both, KINDS)
    assert again.phase == "Starting" and again == plan_rollout(NAME, spec, new_rev, copy.deepcopy(both), KINDS)
    assert router_revision(both) == old_rev

    # 3. both ready: the routers switch to the new revision (a router rollout)
    both[B["decode"]]["status"]["readyReplicas"] = both[B["decode"]]["status"]["updatedReplicas"] = 5
    switch = plan_rollout(NAME, spec, new_rev, both, KINDS)
    assert switch.phase == "Switching" and switch.placement.router_revision == new_rev
    assert switch.keep == frozenset(A.values())
    router_args = desired(new_docs, switch.placement)[ROUTER]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"disagg.dev/revision={new_rev}" in router_args and f"disagg.dev/revision={old_rev}" not in router_args

    # 4. the routers moved but an old router pod still streams: the old pools stay
    switched = {**both, ROUTER: running(new_docs, Placement("b"), terminating_routers=1)[ROUTER]}
    draining = plan_rollout(NAME, spec, new_rev, switched, KINDS)
    assert (draining.phase, draining.serving_slot, draining.serving_revision) == ("Draining", "b", new_rev)
    assert draining.keep == frozenset(A.values())

    # 5. no old router left: the old slot is no longer desired nor kept, so it is deleted
    switched[ROUTER]["status"]["terminatingReplicas"] = 0
    done = plan_rollout(NAME, spec, new_rev, switched, KINDS)
    assert (done.phase, done.placement, done.keep) == ("Complete", Placement("b"), frozenset())
    steps = plan_children([stamp(m) for m in desired(new_docs, done.placement).values()], switched, UID)
    assert {child_key(obj) for obj in steps.delete} == set(A.values())


def test_a_compatible_change_rolls_the_serving_slot_in_place() -> None:
    _, rev, docs = render(BODY)
    live = running(docs, Placement("b"))  # after an earlier rollout, slot b serves
    edited = copy.deepcopy(BODY)
    edited["spec"]["decode"]["resources"]["requests"]["cpu"] = "24"
    spec, same, new_docs = render(edited)
    assert same == rev
    plan = plan_rollout(NAME, spec, rev, live, KINDS)
    assert (plan.phase, plan.placement, plan.keep) == ("Complete", Placement("b"), frozenset())
    steps = plan_children([stamp(m) for m in desired(new_docs, plan.placement).values()], live, UID)
    assert [child_key(m) for m in steps.apply] == [B["decode"]] and steps.create == [] and steps.delete == []


def test_an_abandoned_rollout_goes_back_to_the_serving_revision_and_deletes_the_new_pools() -> None:
    spec, old_rev, old_docs = render(BODY)
    _, _, new_docs = render(body_with(revision="v2"))
    live = {**running(new_docs, Placement("b", router_revision=old_rev), ready=False),
            **running(old_docs, Placement("a"))}
    plan = plan_rollout(NAME, spec, old_rev, live, KINDS)
    assert (plan.phase, plan.placement, plan.keep) == ("Complete", Placement("a"), frozenset())
    steps = plan_children([stamp(m) for m in desired(old_docs, plan.placement).values()], live, UID)
    assert {child_key(obj) for obj in steps.delete} == set(B.values())


def test_a_second_change_mid_switch_waits_for_the_old_routers() -> None:
    _, r0, docs0 = render(BODY)
    _, r1, docs1 = render(body_with(revision="v2"))
    spec, r2, _ = render(body_with(revision="v3"))
    live = {**running(docs0, Placement("a")), **running(docs1, Placement("b"), terminating_routers=1)}
    plan = plan_rollout(NAME, spec, r2, live, KINDS)
    assert (plan.phase, plan.serving_revision, plan.target) == ("Draining", r1, r2)
    assert plan.keep == frozenset(A.values()) | frozenset(B.values())
    assert plan.placement == Placement("b", router_revision=r1)
    assert r0 != r1 != r2


def test_a_rollout_the_budget_cannot_hold_is_blocked_and_the_serving_revision_stays() -> None:
    _, old_rev, old_docs = render(BODY)
    tight = body_with(revision="v2")
    tight["spec"]["acceleratorBudget"] = 10  # the serving 2 + 2 workers hold 8 accelerators; 1 + 1 new need 4
    spec, new_rev, _ = render(tight)
    live = running(old_docs, Placement("a"))
    plan = plan_rollout(NAME, spec, new_rev, live, KINDS)
    assert (plan.phase, plan.blocked, plan.target) == ("Blocked", "InsufficientBudget", new_rev)
    assert plan.placement == Placement("a", router_revision=old_rev) and plan.keep == frozenset(A.values())
    assert "acceleratorBudget is 10" in plan.message and old_rev in plan.message


def test_a_budget_with_some_room_starts_the_new_pools_smaller() -> None:
    _, _, old_docs = render(BODY)
    roomy = body_with(revision="v2")
    roomy["spec"]["acceleratorBudget"] = 14  # 8 held, 6 left: of the 2 + 2 wanted, 1 + 1
    spec, new_rev, _ = render(roomy)
    plan = plan_rollout(NAME, spec, new_rev, running(old_docs, Placement("a")), KINDS)
    assert plan.phase == "Starting" and dict(plan.placement.initial_replicas) == {"prefill": 1, "decode": 1}


def test_in_place_rollouts_keep_the_slot_and_unpin_the_routers() -> None:
    spec, _, docs = render(BODY)
    _, new_rev, _ = render(body_with(revision="v2"))
    plan = plan_in_place(NAME, new_rev, running(docs, Placement("a")), KINDS)
    assert plan.placement == Placement("a", router_revision=ANY_REVISION) and plan.phase == "Complete"
    assert spec is not None


LWS = ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet")
DEEPSEEK = yaml.safe_load((REPO / "tests" / "golden" / "input" / "multinode-vllm-deepseek.yaml").read_text())


def selector(router: dict[str, Any], flag: str) -> list[str]:
    args: list[str] = router["spec"]["template"]["spec"]["containers"][0]["args"]
    start = args.index(flag) + 1
    end = next((i for i in range(start, len(args)) if args[i].startswith("--")), len(args))
    return args[start:end]


def test_a_decode_pool_that_comes_to_span_nodes_rolls_out_beside_the_serving_deployment() -> None:
    two_nodes = copy.deepcopy(DEEPSEEK)
    two_nodes["spec"]["acceleratorBudget"] = 64  # room for the new pools beside the serving ones
    one_node = copy.deepcopy(two_nodes)
    one_node["spec"]["decode"]["parallelism"] = {"data": 8, "expert": True}
    _, old_rev, old_docs = render(one_node)
    spec, new_rev, new_docs = render(two_nodes)
    kinds = {**KINDS, "decode": LWS}
    live = running(old_docs, Placement("a"), size=1)
    assert A["decode"] in live and old_rev != new_rev

    # the LeaderWorkerSet comes up in slot b; the serving Deployment stays, the routers select it as it is
    plan = plan_rollout(NAME, spec, new_rev, live, kinds)
    assert (plan.phase, plan.serving_revision, plan.keep) == ("Starting", old_rev, frozenset(A.values()))
    assert plan.serving_pools(kinds, NAME)["decode"] == A["decode"], "the status reads the serving Deployment"
    wanted = desired(new_docs, plan.placement)
    assert wanted[ROUTER]["spec"]["template"] == live[ROUTER]["spec"]["template"], "the routers must not move yet"
    steps = plan_children([stamp(m) for m in wanted.values()], live, UID, keep=plan.keep)
    assert steps.delete == [], "the serving decode Deployment must stay until the routers switch"
    new_decode = (*LWS, f"{NAME}--decode-b")
    assert new_decode in {child_key(m) for m in steps.create}

    # both new pools ready: the routers switch, selecting the new decode pool's leaders only
    both = {**live, **{k: v for k, v in running(new_docs, plan.placement, size=1).items() if k != ROUTER}}
    both[new_decode] = {**stamp(wanted[new_decode]), "status": {"replicas": 1, "readyReplicas": 1,
                                                                 "updatedReplicas": 1}}
    switch = plan_rollout(NAME, spec, new_rev, both, kinds)
    assert switch.phase == "Switching" and switch.keep == frozenset(A.values())
    decode_selector = selector(desired(new_docs, switch.placement)[ROUTER], "--decode-selector")
    assert "leaderworkerset.sigs.k8s.io/worker-index=0" in decode_selector
    assert f"disagg.dev/revision={new_rev}" in decode_selector
