"""Events/s published durably by the node's outbox vs raw pipelined JetStream publishing, in the same run.

Usage: .venv/bin/python bench/bench_outbox.py [--events 20000] [--repeat 3]

* durable: each event written to the SQLite journal's outbox (`--per-turn`
  events per event-loop turn, committed together by the journal's group commit,
  as the executor's 20 slots do), published by `Outbox` (windows of 256, each
  with `Nats-Msg-Id` = event_id) once committed, and deleted only after its
  JetStream ack; timed from the first journal write to an empty outbox. Writer
  and outbox run concurrently in one event loop, as in the agent.
* raw: the same payloads published with `asyncio.gather` in windows of 256,
  with `Nats-Msg-Id`, nothing else (the reference from infra-facts.md).
* also shown: raw awaited one at a time, and `publish_async` (not used by the
  outbox: its futures do not survive a reconnect the way a retried window does).

Each figure is the median of `--repeat` runs against one embedded nats-server
(file storage, as the real streams). Also shown: the median of the ratios
within each repeat (the paths run back to back) and the CPU time per event of
each path, both steadier than the rates on a loaded machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402
import nats  # noqa: E402

from bench.auth_support import embedded_nats, options  # noqa: E402
from contracts.events import TaskEvent  # noqa: E402
from contracts.ids import new_id, utcnow  # noqa: E402
from runtime import jetstream  # noqa: E402
from runtime.logging import configure_logging  # noqa: E402
from services.node.journal import Journal  # noqa: E402
from services.node.outbox import Outbox  # noqa: E402

WINDOW = 256


def out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def make_event(i: int) -> TaskEvent:
    return TaskEvent(event_id=new_id(), ts=utcnow(), node_id="node-bench", run_id=new_id(),
                     device_serial=f"SIM{i % 100:04d}", seq=i + 1, state="running", attempt=1,
                     error=None, failed_step=None)


async def durable(js: nats.js.JetStreamContext, journal: Journal, n: int, per_turn: int) -> float:
    events = [make_event(i) for i in range(n)]
    outbox = Outbox(journal, js, window=WINDOW)
    stop = asyncio.Event()
    started = time.perf_counter()
    drainer = asyncio.create_task(outbox.run(stop))
    for i, ev in enumerate(events):
        journal.add_event(ev)  # staged; the journal commits what one loop turn staged in one transaction
        if i % per_turn == per_turn - 1:
            await asyncio.sleep(0)  # the executor's tasks yield between events too
    while journal.outbox_size():  # noqa: ASYNC110 - polling the journal, which has no event to await
        await asyncio.sleep(0.001)
    elapsed = time.perf_counter() - started
    stop.set()
    await drainer
    assert outbox.published == n
    return n / elapsed


async def raw_gather(js: nats.js.JetStreamContext, n: int) -> float:
    payloads = [(msgspec.json.encode(make_event(i)), new_id()) for i in range(n)]
    started = time.perf_counter()
    for lo in range(0, n, WINDOW):
        await asyncio.gather(*(js.publish("doai.evt.raw.task", p, headers={"Nats-Msg-Id": mid})
                               for p, mid in payloads[lo:lo + WINDOW]))
    return n / (time.perf_counter() - started)


async def raw_one_by_one(js: nats.js.JetStreamContext, n: int) -> float:
    payloads = [(msgspec.json.encode(make_event(i)), new_id()) for i in range(n)]
    started = time.perf_counter()
    for p, mid in payloads:
        await js.publish("doai.evt.raw1.task", p, headers={"Nats-Msg-Id": mid})
    return n / (time.perf_counter() - started)


async def raw_async(js: nats.js.JetStreamContext, n: int) -> float:
    payloads = [(msgspec.json.encode(make_event(i)), new_id()) for i in range(n)]
    started = time.perf_counter()
    for p, mid in payloads:
        await js.publish_async("doai.evt.rawa.task", p, headers={"Nats-Msg-Id": mid})
    await js.publish_async_completed()
    return n / (time.perf_counter() - started)


async def main(n: int, repeat: int, per_turn: int) -> None:
    configure_logging(level="warning")
    with tempfile.TemporaryDirectory() as tmp:
        server = embedded_nats(Path(tmp) / "nats")
        server.start()
        try:
            nc = await nats.connect(server.url, **options(server))
            js = nc.jetstream()
            await jetstream.ensure_streams(js)
            size = len(msgspec.json.encode(make_event(1)))
            results: dict[str, list[float]] = {"durable": [], "raw": [], "one": [], "async": []}
            cpu: dict[str, list[float]] = {"durable": [], "raw": [], "async": []}  # CPU µs per event

            async def timed(key: str, m: int, run: Coroutine[Any, Any, float]) -> None:
                c0 = time.process_time()
                results[key].append(await run)
                if key in cpu:
                    cpu[key].append((time.process_time() - c0) / m * 1e6)

            for r in range(repeat):
                journal = Journal(Path(tmp) / f"journal-{r}.sqlite")
                await timed("raw", n, raw_gather(js, n))
                await timed("durable", n, durable(js, journal, n, per_turn))
                await timed("one", min(n, 5000), raw_one_by_one(js, min(n, 5000)))
                await timed("async", n, raw_async(js, n))
                journal.close()
            await nc.close()
        finally:
            server.stop()
    med = {k: statistics.median(v) for k, v in results.items()}
    out(f"outbox benchmark: {n} events of {size} bytes, {per_turn} recorded per loop turn, median of {repeat}"
        " (uvloop: no)")
    out("| path | events/s |")
    out("|---|---|")
    out(f"| durable: journal group commit per loop turn + Outbox windows of {WINDOW} with Nats-Msg-Id + ack "
        f"+ delete | {med['durable']:,.0f} |")
    out(f"| raw: `asyncio.gather` windows of {WINDOW} with Nats-Msg-Id | {med['raw']:,.0f} |")
    out(f"| raw: awaited one at a time | {med['one']:,.0f} |")
    out(f"| raw: `publish_async` + `publish_async_completed()` | {med['async']:,.0f} |")
    out(f"| durable / raw gather | {med['durable'] / med['raw']:.0%} |")
    out(f"| durable / `publish_async` | {med['durable'] / med['async']:.0%} |")
    # On a loaded machine the medians of each path may come from different moments: the ratio
    # within each repeat (the paths ran back to back) and the CPU time per event are steadier.
    per_gather = statistics.median(d / g for d, g in zip(results["durable"], results["raw"], strict=True))
    per_async = statistics.median(d / a for d, a in zip(results["durable"], results["async"], strict=True))
    out(f"| median of per-repeat ratios: durable / gather, durable / `publish_async` "
        f"| {per_gather:.0%}, {per_async:.0%} |")
    out("| CPU µs per event: durable / gather / `publish_async` | "
        + " / ".join(f"{statistics.median(cpu[k]):.0f}" for k in ("durable", "raw", "async")) + " |")
    out("runs: " + ", ".join(f"{k}={[round(x) for x in v]}" for k, v in results.items()))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--per-turn", type=int, default=20,
                   help="events recorded per event-loop turn (20 slots each finishing a step: 20)")
    a = p.parse_args()
    asyncio.run(main(a.events, a.repeat, a.per_turn))
