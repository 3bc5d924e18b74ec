"""Events/s published durably by the node's outbox vs raw pipelined JetStream publishing, in the same run.

Usage: .venv/bin/python bench/bench_outbox.py [--events 20000] [--repeat 3]

* durable: each event written to the SQLite journal's outbox (one commit per
  event, as the executor does), published by `Outbox` (windows of 256, each
  with `Nats-Msg-Id` = event_id), and deleted only after its JetStream ack;
  timed from the first journal write to an empty outbox. Writer and outbox run
  concurrently in one event loop, as in the agent.
* raw: the same payloads published with `asyncio.gather` in windows of 256,
  with `Nats-Msg-Id`, nothing else (the reference from infra-facts.md).
* also shown: raw awaited one at a time, and `publish_async` (not used by the
  outbox: its futures do not survive a reconnect the way a retried window does).

Each figure is the median of `--repeat` runs against one embedded nats-server
(file storage, as the real streams).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

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


async def durable(js: nats.js.JetStreamContext, journal: Journal, n: int) -> float:
    events = [make_event(i) for i in range(n)]
    outbox = Outbox(journal, js, window=WINDOW)
    stop = asyncio.Event()
    started = time.perf_counter()
    drainer = asyncio.create_task(outbox.run(stop))
    for i, ev in enumerate(events):
        journal.add_event(ev)  # one committed row per event
        outbox.wake()
        if i % 64 == 63:
            await asyncio.sleep(0)  # the executor yields between events too
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


async def main(n: int, repeat: int) -> None:
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
            for r in range(repeat):
                journal = Journal(Path(tmp) / f"journal-{r}.sqlite")
                results["raw"].append(await raw_gather(js, n))
                results["durable"].append(await durable(js, journal, n))
                results["one"].append(await raw_one_by_one(js, min(n, 5000)))
                results["async"].append(await raw_async(js, n))
                journal.close()
            await nc.close()
        finally:
            server.stop()
    med = {k: statistics.median(v) for k, v in results.items()}
    out(f"outbox benchmark: {n} events of {size} bytes, median of {repeat} (uvloop: no)")
    out("| path | events/s |")
    out("|---|---|")
    out(f"| durable: journal commit per event + Outbox windows of {WINDOW} with Nats-Msg-Id + ack + delete "
        f"| {med['durable']:,.0f} |")
    out(f"| raw: `asyncio.gather` windows of {WINDOW} with Nats-Msg-Id | {med['raw']:,.0f} |")
    out(f"| raw: awaited one at a time | {med['one']:,.0f} |")
    out(f"| raw: `publish_async` + `publish_async_completed()` | {med['async']:,.0f} |")
    out(f"| durable / raw gather | {med['durable'] / med['raw']:.0%} |")
    out("runs: " + ", ".join(f"{k}={[round(x) for x in v]}" for k, v in results.items()))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    asyncio.run(main(a.events, a.repeat))
