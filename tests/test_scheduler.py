"""The slot scheduler (DESIGN.md rules 1–3): device lock, global slots, per-device FIFO, round-robin."""

from __future__ import annotations

import itertools
import random
from collections import defaultdict, deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.node.journal import Job
from services.node.scheduler import Scheduler

_ords = itertools.count(1)


def job(serial: str, run_id: str = "run-1") -> Job:
    return Job(run_id=run_id, serial=serial, ord=next(_ords))


def serials(jobs: list[Job]) -> list[str]:
    return [j.serial for j in jobs]


def assert_invariants(s: Scheduler, all_serials: set[str]) -> None:
    # One job per device is structural (running is keyed by serial); check the key matches the job.
    for serial, running in s.running.items():
        assert running.serial == serial
    assert len(s.running) <= s.slots
    if len(s.running) < s.slots:
        waiting = [d for d in all_serials if s.eligible(d)]
        assert not waiting, f"{len(s.running)}/{s.slots} slots busy while {waiting} are eligible"


# -- plain unit tests ----------------------------------------------------------------------------


def test_slots_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Scheduler(0)


def test_fills_every_free_slot_at_once() -> None:
    s = Scheduler(3)
    for d in "ABCDE":
        s.submit(job(d))
    started = s.start_all()
    assert serials(started) == ["A", "B", "C"]
    assert set(s.running) == {"A", "B", "C"}
    assert s.queued == 2
    assert s.start_all() == []
    assert s.next_job() is None


def test_next_job_starts_when_a_slot_frees() -> None:
    s = Scheduler(2)
    for d in "ABC":
        s.submit(job(d))
    s.start_all()
    done = s.finish("A")
    assert done.serial == "A"
    assert serials(s.start_all()) == ["C"]
    assert set(s.running) == {"B", "C"}
    assert s.queued == 0


def test_one_job_per_device_even_with_free_slots() -> None:
    s = Scheduler(5)
    first, second, third = job("A"), job("A"), job("A")
    for j in (first, second, third):
        s.submit(j)
    assert s.start_all() == [first]
    assert s.start_all() == []
    assert s.running == {"A": first}
    assert s.finish("A") is first
    assert s.start_all() == [second]
    assert s.finish("A") is second
    assert s.start_all() == [third]
    assert s.queued == 0


def test_finish_of_an_idle_device_raises() -> None:
    s = Scheduler(1)
    with pytest.raises(KeyError):
        s.finish("A")


def test_round_robin_interleaves_devices() -> None:
    s = Scheduler(1)
    for d, n in (("A", 3), ("B", 2), ("C", 1)):
        for _ in range(n):
            s.submit(job(d))
    order: list[str] = []
    for _ in range(6):
        [started] = s.start_all()
        order.append(started.serial)
        s.finish(started.serial)
    assert order == ["A", "B", "C", "A", "B", "A"]
    assert s.queued == 0


def test_round_robin_a_busy_device_does_not_starve_others() -> None:
    s = Scheduler(1)
    for _ in range(50):
        s.submit(job("A"))
    s.submit(job("B"))
    s.submit(job("C"))
    order: list[str] = []
    while True:
        started = s.start_all()
        if not started:
            break
        order.extend(serials(started))
        s.finish(started[0].serial)
    assert len(order) == 52
    # B and C each start within the first turn of the rotation (A, B, C), not after A's backlog.
    assert order.index("B") <= 2
    assert order.index("C") <= 2
    assert order[3:] == ["A"] * 49


def test_round_robin_late_arrivals_start_within_one_turn() -> None:
    s = Scheduler(1)
    for _ in range(50):
        s.submit(job("A"))
    [first] = s.start_all()
    assert first.serial == "A"
    s.submit(job("B"))
    s.submit(job("C"))
    order: list[str] = []
    for _ in range(4):
        s.finish(order[-1] if order else "A")
        [started] = s.start_all()
        order.append(started.serial)
    assert order == ["B", "C", "A", "A"]


def test_fifo_per_device() -> None:
    s = Scheduler(2)
    a = [job("A", f"run-{i}") for i in range(5)]
    b = [job("B", f"run-{i}") for i in range(5)]
    for x, y in zip(a, b, strict=True):
        s.submit(x)
        s.submit(y)
    started: dict[str, list[Job]] = defaultdict(list)
    while s.running or s.queued:
        for j in s.start_all():
            started[j.serial].append(j)
        for d in list(s.running):
            s.finish(d)
    assert started["A"] == a
    assert started["B"] == b


def test_offline_devices_are_not_started_and_resume_when_online() -> None:
    s = Scheduler(5)
    for d in "ABC":
        s.submit(job(d))
    s.set_online(["A"])
    assert not s.is_online("B")
    assert not s.eligible("B")
    assert serials(s.start_all()) == ["A"]
    assert s.queued == 2
    s.set_online(["A", "C"])
    assert serials(s.start_all()) == ["C"]
    s.set_online(["A", "B", "C"])
    assert serials(s.start_all()) == ["B"]
    assert s.queued == 0


def test_every_device_is_online_until_the_first_inventory() -> None:
    s = Scheduler(2)
    assert s.is_online("never-seen")
    s.submit(job("A"))
    assert s.eligible("A")
    s.set_online([])
    assert not s.is_online("A")
    assert not s.eligible("A")
    assert s.start_all() == []


def test_a_running_device_going_offline_keeps_its_slot_until_it_finishes() -> None:
    s = Scheduler(1)
    s.submit(job("A"))
    s.submit(job("A"))
    s.submit(job("B"))
    s.start_all()
    s.set_online(["B"])
    assert "A" in s.running
    assert s.start_all() == []  # the only slot is still held by A
    s.finish("A")
    assert serials(s.start_all()) == ["B"]
    s.finish("B")
    assert s.start_all() == []  # A still has queued work but is offline
    assert s.queued == 1


def test_remove_queued_takes_only_matching_queued_jobs() -> None:
    s = Scheduler(1)
    a1, a2, b1, b2, c1 = job("A", "r1"), job("A", "r2"), job("B", "r1"), job("B", "r2"), job("C", "r2")
    for j in (a1, a2, b1, b2, c1):
        s.submit(j)
    assert s.start_all() == [a1]
    removed = s.remove_queued(lambda j: j.run_id == "r2")
    assert sorted(removed, key=lambda j: j.ord) == [a2, b2, c1]
    assert s.running == {"A": a1}  # running jobs are not touched
    assert s.queued == 1
    s.finish("A")
    assert s.start_all() == [b1]
    s.finish("B")
    assert s.start_all() == []
    assert s.remove_queued(lambda j: True) == []


def test_remove_queued_keeps_fifo_of_the_rest() -> None:
    s = Scheduler(1)
    jobs = [job("A", f"r{i % 2}") for i in range(6)]
    for j in jobs:
        s.submit(j)
    s.remove_queued(lambda j: j.run_id == "r1")
    order = []
    while started := s.start_all():
        order.extend(started)
        s.finish("A")
    assert order == [j for j in jobs if j.run_id == "r0"]


def test_queued_counts_only_waiting_jobs() -> None:
    s = Scheduler(2)
    assert s.queued == 0
    for d in "AAB":
        s.submit(job(d))
    assert s.queued == 3
    s.start_all()
    assert s.queued == 1


# -- randomized simulation -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_random_simulation_keeps_invariants(seed: int) -> None:
    rng = random.Random(seed)
    slots = rng.choice([1, 2, 5, 20])
    fleet = [f"D{i:02d}" for i in range(30)]
    s = Scheduler(slots)
    submitted: dict[str, deque[Job]] = defaultdict(deque)  # model: what each device still has queued
    online: set[str] | None = None  # model: None until the first inventory
    running: set[str] = set()  # model: devices holding a slot
    ring: list[str] = []  # model: the rotation, devices in order of first submit
    last: list[str] = []  # model: the device started most recently
    started_order: dict[str, list[int]] = defaultdict(list)
    # Round-robin witness: for each device that has stayed eligible, who started since it became so.
    waited_on: dict[str, set[str]] = {}
    runs = [f"run-{i}" for i in range(4)]
    starts = finishes = 0

    def is_online(serial: str) -> bool:
        return online is None or serial in online

    def model_eligible(serial: str) -> bool:
        return bool(submitted[serial]) and serial not in running and is_online(serial)

    def model_next() -> str | None:
        """Round-robin oracle: the first eligible device after the last one started, around the ring."""
        if len(running) >= slots or not ring:
            return None
        start = ring.index(last[-1]) + 1 if last else 0
        for k in range(len(ring)):
            d = ring[(start + k) % len(ring)]
            if model_eligible(d):
                return d
        return None

    def start_and_check() -> None:
        nonlocal starts
        before = {d for d in fleet if model_eligible(d)}
        assert before == {d for d in fleet if s.eligible(d)}
        for d in list(waited_on):
            if d not in before:
                del waited_on[d]  # it stopped being eligible: its wait starts again later
        for d in before:
            waited_on.setdefault(d, set())
        started = s.start_all()
        starts += len(started)
        for j in started:
            assert j.serial in before, f"{j.serial} started but was not eligible"
            assert j.serial == model_next(), f"round-robin order broken (seed {seed})"
            running.add(j.serial)
            last.append(j.serial)
            assert is_online(j.serial)
            # FIFO: the device's oldest queued job starts.
            expected = submitted[j.serial].popleft()
            assert j is expected
            started_order[j.serial].append(j.ord)
            # Round-robin: while D waits, no other device starts twice.
            for d, seen in waited_on.items():
                if d == j.serial:
                    continue
                assert j.serial not in seen, f"{j.serial} started twice while {d} waited (seed {seed})"
                seen.add(j.serial)
            waited_on.pop(j.serial, None)
        assert model_next() is None
        assert set(s.running) == running
        assert_invariants(s, set(fleet))
        assert s.queued == sum(len(q) for q in submitted.values())

    for _ in range(2_000):
        op = rng.random()
        if op < 0.45:
            for _ in range(rng.randint(1, 5)):
                j = job(rng.choice(fleet), rng.choice(runs))
                s.submit(j)
                if j.serial not in ring:
                    ring.append(j.serial)
                submitted[j.serial].append(j)
        elif op < 0.80:
            if s.running:
                serial = rng.choice(sorted(s.running))
                finished = s.finish(serial)
                assert finished.serial == serial
                running.discard(serial)
                finishes += 1
        elif op < 0.95:
            online = set(rng.sample(fleet, rng.randint(0, len(fleet))))
            if rng.random() < 0.3:
                online.add("not-in-fleet")
            s.set_online(online)
        else:
            run = rng.choice(runs)

            def in_run(j: Job, run: str = run) -> bool:
                return j.run_id == run

            removed = s.remove_queued(in_run)
            assert all(j.run_id == run for j in removed)
            expected_removed = {id(j) for q in submitted.values() for j in q if j.run_id == run}
            assert {id(j) for j in removed} == expected_removed
            for serial, q in submitted.items():
                submitted[serial] = deque(j for j in q if j.run_id != run)
        start_and_check()

    # Drain: everything left starts eventually once all devices are online.
    online = set(fleet)
    s.set_online(online)
    start_and_check()
    while s.running:
        serial = rng.choice(sorted(s.running))
        s.finish(serial)
        running.discard(serial)
        finishes += 1
        start_and_check()
    assert s.queued == 0
    assert starts == finishes
    assert starts > 100, "the simulation should exercise the scheduler"
    for serial, ords in started_order.items():
        assert ords == sorted(ords), f"{serial} started out of submit order"


# -- offline devices, vendor availability ---------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_vendor_unavailable_pauses_every_start_and_keeps_the_queues() -> None:
    s = Scheduler(3)
    for d in "ABC":
        s.submit(job(d))
    s.set_vendor_available(False)
    assert s.start_all() == [] and not s.eligible("A")
    assert s.queued == 3
    s.set_vendor_available(True)
    assert serials(s.start_all()) == ["A", "B", "C"]


def test_jobs_of_a_device_offline_past_the_grace_period_expire() -> None:
    clock = FakeClock()
    s = Scheduler(2, clock=clock)
    a1, a2, b1 = job("A"), job("A"), job("B")
    for j in (a1, a2, b1):
        s.submit(j)
    s.set_online(["B"])  # A went offline at t=1000
    assert serials(s.start_all()) == ["B"]
    clock.now += 59
    assert s.expire_offline(60) == []
    clock.now += 1
    assert s.expire_offline(60) == [a1, a2]
    assert s.queued == 0 and s.running == {"B": b1}  # a running job is never expired


def test_grace_counts_only_the_time_a_job_waited() -> None:
    clock = FakeClock()
    s = Scheduler(1, clock=clock)
    s.set_online(["B"])  # A offline since t=1000 (no job yet)
    clock.now += 500
    late = job("A")
    s.submit(late)
    clock.now += 30
    assert s.expire_offline(60) == []  # it has waited 30 s, not 530
    clock.now += 30
    assert s.expire_offline(60) == [late]


def test_coming_back_online_resets_the_grace_period() -> None:
    clock = FakeClock()
    s = Scheduler(1, clock=clock)
    a = job("A")
    s.submit(a)
    s.set_online([])
    clock.now += 50
    s.set_online(["A"])
    s.set_online([])
    clock.now += 50
    assert s.expire_offline(60) == []
    clock.now += 10
    assert s.expire_offline(60) == [a]


def test_nothing_expires_while_the_vendor_is_unavailable() -> None:
    clock = FakeClock()
    s = Scheduler(1, clock=clock)
    s.submit(job("A"))
    s.set_online([])
    s.set_vendor_available(False)
    clock.now += 3600
    assert s.expire_offline(60) == []
    assert s.queued == 1


# -- property-based (hypothesis) -------------------------------------------------------------------

DEVICES = [f"D{i}" for i in range(8)]
RUNS = ["r0", "r1", "r2"]

_op = st.one_of(
    st.tuples(st.just("submit"), st.sampled_from(DEVICES), st.integers(1, 6), st.sampled_from(RUNS)),
    st.tuples(st.just("finish"), st.integers(0, 10_000)),
    st.tuples(st.just("finish"), st.integers(0, 10_000)),
    st.tuples(st.just("online"), st.frozensets(st.sampled_from(DEVICES))),
    st.tuples(st.just("vendor"), st.booleans()),
    st.tuples(st.just("cancel"), st.sampled_from(RUNS)),
    st.tuples(st.just("tick"), st.floats(0, 40)),
)


@settings(max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(slots=st.integers(1, 5), ops=st.lists(_op, max_size=120))
def test_property_invariants_hold_under_any_arrivals_durations_and_failures(
    slots: int, ops: list[tuple[object, ...]]
) -> None:
    """Never two jobs on one device; never more than `slots`; work-conserving; FIFO; round-robin.

    "finish" with a random index models random durations and failures (a failed
    job frees its slot like any other); "online"/"vendor" model inventory polls;
    "cancel" drops a run's queued jobs; "tick" advances the clock for expiry.
    """
    clock = FakeClock()
    s = Scheduler(slots, clock=clock)
    submitted: dict[str, list[Job]] = defaultdict(list)
    started_per_device: dict[str, list[int]] = defaultdict(list)
    waited_on: dict[str, set[str]] = {}  # device continuously eligible -> devices started since
    removed_ids: set[int] = set()

    for op in ops:
        match op:
            case ("submit", str(device), int(n), str(run)):
                for _ in range(n):
                    j = job(device, run)
                    submitted[device].append(j)
                    s.submit(j)
            case ("finish", int(i)):
                if s.running:
                    s.finish(sorted(s.running)[i % len(s.running)])
            case ("online", frozenset() as online):
                s.set_online(online)
            case ("vendor", bool(available)):
                s.set_vendor_available(available)
            case ("cancel", str(run)):
                removed_ids |= {id(j) for j in s.remove_queued(lambda j, r=run: j.run_id == r)}
            case ("tick", float(dt)):
                clock.now += dt
                for j in s.expire_offline(30.0):
                    assert not s.is_online(j.serial)
                    removed_ids.add(id(j))
        eligible_before = {d for d in DEVICES if s.eligible(d)}
        for d in list(waited_on):
            if d not in eligible_before:
                del waited_on[d]
        for d in eligible_before:
            waited_on.setdefault(d, set())
        for j in s.start_all():
            assert j.serial in eligible_before
            started_per_device[j.serial].append(j.ord)
            for d, seen in waited_on.items():
                if d != j.serial:
                    # Round-robin: while d waits, no other device starts twice.
                    assert j.serial not in seen, f"{j.serial} started twice while {d} waited"
                    seen.add(j.serial)
            waited_on.pop(j.serial, None)
        # Device lock and slots.
        assert len(s.running) <= slots
        assert all(r.serial == d for d, r in s.running.items())
        # Work-conserving: a free slot means nobody eligible is waiting.
        if len(s.running) < slots:
            assert not [d for d in DEVICES if s.eligible(d)]
        # FIFO per device: the started jobs are a prefix of the submitted ones minus removed ones.
        for d, ords in started_per_device.items():
            expected = [j.ord for j in submitted[d] if id(j) not in removed_ids]
            assert ords == expected[: len(ords)], f"{d} started out of order"


@settings(max_examples=60, deadline=None, database=None)
@given(
    slots=st.integers(1, 4),
    backlog=st.integers(20, 50),
    others=st.lists(st.tuples(st.sampled_from(DEVICES[1:]), st.integers(0, 30)), min_size=1, max_size=6,
                    unique_by=lambda t: t[0]),
)
def test_property_a_long_backlog_delays_a_newcomer_by_at_most_one_turn(
    slots: int, backlog: int, others: list[tuple[str, int]]
) -> None:
    """A device with 50 queued jobs cannot delay another device's first job by more than one rotation.

    Devices arrive after `k` completions; from its arrival until its first
    start, the busy device D0 may start at most once (and no device twice).
    """
    s = Scheduler(slots)
    for _ in range(backlog):
        s.submit(job("D0"))
    s.start_all()
    arrivals = sorted(others, key=lambda t: t[1])
    completions = 0
    starts_since: dict[str, list[str]] = {}
    first_started: set[str] = set()
    while s.running or arrivals or s.queued:
        while arrivals and (arrivals[0][1] <= completions or not s.running):
            device, _ = arrivals.pop(0)
            s.submit(job(device))
            starts_since[device] = []
        for j in s.start_all():
            for d, seen in starts_since.items():
                if d not in first_started:
                    seen.append(j.serial)
            first_started.add(j.serial)
        if s.running:
            s.finish(sorted(s.running)[completions % len(s.running)])
            completions += 1
    assert first_started >= set(starts_since)
    for device, seen in starts_since.items():
        before = seen[: seen.index(device)] if device in seen else seen
        assert before.count("D0") <= 1, f"{device} waited {before}"
        assert len(before) == len(set(before)), f"someone started twice before {device}: {before}"
