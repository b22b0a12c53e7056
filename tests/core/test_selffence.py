"""Unit tests for vmcluster.core.selffence: the lease deadline and resiliency period -> actions.

Direct calls with explicit ``now``; no event loop, no processes."""

from vmcluster.core.selffence import FenceState, FreezeAll, KillAll, SelfFence, Thaw

A, B = ("web", 2), ("db", 5)
BOTH = frozenset({A, B})
VALID = 10.0  # the lease is known valid until 10.0; with a 0.5 s margin the deadline is 9.5


def test_nothing_happens_while_the_lease_is_known_valid() -> None:
    fence = SelfFence(margin_s=0.5, resiliency_s=0)
    assert fence.update(now=9.49, valid_until=VALID, instances=BOTH) == ()
    assert fence.next_deadline() == 9.5
    assert fence.state is FenceState.CLEAR


def test_past_the_deadline_every_instance_is_killed_once() -> None:
    fence = SelfFence(margin_s=0.5, resiliency_s=0)
    assert fence.update(now=9.5, valid_until=VALID, instances=BOTH) == (KillAll(keys=(B, A)),)
    assert fence.state is FenceState.KILLED
    assert fence.update(now=9.6, valid_until=VALID, instances=BOTH) == ()  # exiting: not again
    assert fence.next_deadline() is None


def test_an_instance_that_appears_after_the_kill_is_killed_too() -> None:
    fence = SelfFence(margin_s=0.5, resiliency_s=0)
    fence.update(now=9.5, valid_until=VALID, instances={A})
    assert fence.update(now=9.6, valid_until=VALID, instances=BOTH) == (KillAll(keys=(B,)),)


def test_no_instances_nothing_to_do() -> None:
    fence = SelfFence(margin_s=0.5, resiliency_s=0)
    assert fence.update(now=11, valid_until=VALID, instances=frozenset()) == ()


def test_with_a_resiliency_period_they_are_frozen_then_killed_when_it_ends() -> None:
    fence = SelfFence(margin_s=0.5, resiliency_s=30)
    assert fence.update(now=9.5, valid_until=VALID, instances=BOTH) == (
        FreezeAll(keys=(B, A), resiliency_s=30),
    )
    assert fence.next_deadline() == 39.5
    assert fence.update(now=39.49, valid_until=VALID, instances=BOTH) == ()
    assert fence.update(now=39.5, valid_until=VALID, instances=BOTH) == (KillAll(keys=(B, A)),)


def test_a_renewal_within_the_period_thaws_only_what_is_still_owned() -> None:
    fence = SelfFence(margin_s=0.5, resiliency_s=30)
    fence.update(now=9.5, valid_until=VALID, instances=BOTH)
    actions = fence.update(now=12, valid_until=17, instances=BOTH, frozen=BOTH, owned={A})
    assert actions == (Thaw(keys=(A,)),)
    assert fence.state is FenceState.CLEAR
    assert fence.next_deadline() == 16.5


def test_a_watchdog_freeze_that_lands_after_the_renewal_is_undone() -> None:
    """The agent never saw its lease lapse, but the watchdog (its own deadline read before the
    renewal reached it) froze the instance: found frozen while the lease is valid, resumed."""
    fence = SelfFence(margin_s=0.5, resiliency_s=30)
    assert fence.update(now=9, valid_until=VALID, instances={A}) == ()
    assert fence.update(now=9.2, valid_until=15, instances={A}, frozen={A}, owned={A}) == (
        Thaw(keys=(A,)),
    )


def test_a_frozen_instance_that_is_not_owned_stays_frozen() -> None:
    fence = SelfFence(margin_s=0.5, resiliency_s=30)
    assert fence.update(now=1, valid_until=VALID, instances={A}, frozen={A}, owned=set()) == ()


def test_a_lease_lost_again_after_a_thaw_starts_a_new_period() -> None:
    fence = SelfFence(margin_s=0.5, resiliency_s=30)
    fence.update(now=9.5, valid_until=VALID, instances={A})
    fence.update(now=12, valid_until=17, instances={A}, frozen={A}, owned={A})
    assert fence.update(now=16.5, valid_until=17, instances={A}) == (
        FreezeAll(keys=(A,), resiliency_s=30),
    )
    assert fence.next_deadline() == 46.5


def test_an_instance_that_appears_while_frozen_is_frozen_too() -> None:
    fence = SelfFence(margin_s=0.5, resiliency_s=30)
    fence.update(now=9.5, valid_until=VALID, instances={A})
    assert fence.update(now=9.6, valid_until=VALID, instances=BOTH) == (
        FreezeAll(keys=(B,), resiliency_s=30),
    )
    assert fence.update(now=9.7, valid_until=VALID, instances=BOTH) == ()
