"""The forwarder's in-flight budget (vmcluster.forwarder.budget): pure, direct calls."""

from vmcluster.forwarder.budget import InFlightBudget

MIB = 1 << 20


def budget() -> InFlightBudget:
    return InFlightBudget(total=16 * MIB, most=8 * MIB, least=2 * MIB)


def test_one_busy_disk_may_hold_the_per_disk_cap_then_pauses_until_half() -> None:
    b = budget()
    assert not b.take("a", 8 * MIB)
    assert b.take("a", 1)  # over 8 MiB: pause
    assert not b.give("a", 3 * MIB)  # 5 MiB: still over half
    assert b.give("a", 1 * MIB + 1)  # 4 MiB: resume
    assert b.held("a") == 4 * MIB


def test_busy_disks_share_the_total_and_each_keeps_the_floor() -> None:
    b = budget()
    for disk in "abcd":
        b.take(disk, 1)
    assert b.share() == 4 * MIB  # 16 MiB among 4
    for disk in "efgh":
        b.take(disk, 1)
    assert b.share() == 2 * MIB  # 16 MiB among 8
    for disk in "ijkl":
        b.take(disk, 1)
    assert b.share() == 2 * MIB  # never under the floor
    assert b.take("a", 2 * MIB)  # a is over its share now


def test_a_disk_that_holds_its_share_does_not_stop_the_others() -> None:
    # Requests waiting for a path keep their data: that disk holds its share, no more.
    b = budget()
    assert b.take("stuck", 9 * MIB)  # paused, alone
    assert not b.take("other", 7 * MIB)  # the other still gets its share (8 MiB among 2)
    assert b.take("other", 2 * MIB)


def test_a_disk_that_empties_or_is_forgotten_counts_no_more() -> None:
    b = budget()
    b.take("a", 3 * MIB)
    b.take("b", 3 * MIB)
    assert b.share() == 8 * MIB
    assert b.give("a", 3 * MIB)
    assert b.held("a") == 0
    b.forget("b")
    assert b.held("b") == 0
    assert b.share() == 8 * MIB  # nobody busy: one disk's cap
