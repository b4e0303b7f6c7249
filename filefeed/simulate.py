"""Play the mediarithmics platform against a running filefeed over real HTTP.

creation -> connection -> N user_segment_update calls (realistic identifiers) -> batch_update calls carrying the
returned BATCH_DELIVERY items, grouped by grouping_key and cut at --batch-size, like the platform's batching.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson


@dataclass
class SimulationReport:
    users: int = 0
    update_answers: dict[int | str, int] = field(default_factory=lambda: defaultdict(int))
    items: int = 0
    items_by_operation: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    batches: int = 0
    batch_answers: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    sent_items_in_success: int = 0
    sent_items_in_error: int = 0
    seconds: float = 0.0
    creation: dict[str, Any] = field(default_factory=dict)
    connection: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "users": self.users, "update_answers": dict(self.update_answers), "items": self.items,
            "items_by_operation": dict(self.items_by_operation),
            "batches": self.batches, "batch_answers": dict(self.batch_answers),
            "sent_items_in_success": self.sent_items_in_success, "sent_items_in_error": self.sent_items_in_error,
            "seconds": round(self.seconds, 3), "creation": self.creation, "connection": self.connection,
            "errors": self.errors[:10],
        }


def user_identifiers(i: int, rng: random.Random) -> list[dict[str, Any]]:
    """A user as the platform sends it: user point, hashed email, account, device with a mobile ad id."""
    now = 1717494873000
    ids: list[dict[str, Any]] = [
        {"type": "USER_POINT", "user_point_id": str(uuid.UUID(int=rng.getrandbits(128))), "creation_ts": now},
        {"type": "USER_EMAIL", "hash": hashlib.sha256(f"user{i}@example.com".encode()).hexdigest(),
         "creation_ts": now, "last_activity_ts": now, "providers": []},
    ]
    if i % 3 == 0:
        ids.append({"type": "USER_ACCOUNT", "user_account_id": f"crm-{i:08d}", "compartment_id": "7",
                    "creation_ts": now})
    if i % 2 == 0:
        ids.append({"type": "USER_DEVICE_POINT", "id": f"dp-{i}", "creation_ts": now, "last_activity_ts": now,
                    "technical_identifiers": [{"type": "MOBILE_ADVERTISING_ID",
                                               "user_agent_id": str(uuid.UUID(int=rng.getrandbits(128))).upper(),
                                               "registry_id": "1", "creation_ts": now, "last_activity_ts": now}]})
    ids.append({"type": "USER_AGENT", "vector_id": f"vec:{rng.getrandbits(40)}", "creation_ts": now,
                "last_activity_ts": now, "providers": [], "mappings": []})
    return ids


class NoPlugin(Exception):
    """Nothing usable answers at the URL: no server listening, or not a filefeed."""


async def _lifecycle_call(client: httpx.AsyncClient, route: str, body: dict[str, Any]) -> dict[str, Any]:
    try:
        r = await client.post(f"/v1/{route}", content=orjson.dumps(body), timeout=30)
        answer = r.json()
    except httpx.HTTPError as e:
        raise NoPlugin(f"no filefeed answers at {client.base_url} ({type(e).__name__}: {e or 'no answer'})") from None
    except ValueError:
        raise NoPlugin(f"{client.base_url}/v1/{route} answered HTTP {r.status_code} that is not JSON: "
                       "is it a filefeed?") from None
    if not isinstance(answer, dict):
        raise NoPlugin(f"{client.base_url}/v1/{route} answered JSON that is not an object: is it a filefeed?")
    return {"code": r.status_code, **answer}


async def simulate(base_url: str, *, feed_id: str = "42", segment_id: str = "451256", datamart_id: str = "1023",
                   users: int = 1000, delete_ratio: float = 0.0, batch_size: int = 1000, concurrency: int = 32,
                   seed: int = 1, progress: Callable[[int], None] | None = None) -> SimulationReport:
    rng = random.Random(seed)
    report = SimulationReport(users=users)
    session_id = str(int(time.time()))
    base = {"feed_id": feed_id, "datamart_id": datamart_id, "segment_id": segment_id}
    pending: dict[str, list[Any]] = defaultdict(list)
    batch_lock = asyncio.Lock()
    started = time.perf_counter()
    # No surplus idle connection and no client-side expiry: httpcore's pool can close a connection it has just handed
    # to a request (encode/httpcore#1110), which then fails unanswered; the server closes idle ones (75 s).
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=None)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits, trust_env=False) as client:
        report.creation = await _lifecycle_call(client, "external_segment_creation", base)
        report.connection = await _lifecycle_call(client, "external_segment_connection", base)
        if report.creation.get("status") != "ok":
            report.errors.append(f"creation failed: {report.creation.get('message')}")
            return report

        async def send_batch(grouping_key: str, items: list[Any]) -> None:
            body = {"batch_content": items, "ts": int(time.time() * 1000),
                    "context": {"endpoint": "/v1/user_segment_update", "feed_id": feed_id,
                                "feed_session_id": session_id, "segment_id": segment_id,
                                "datamart_id": datamart_id, "grouping_key": grouping_key}}
            for _attempt in range(5):
                try:
                    r = await client.post("/v1/batch_update", content=orjson.dumps(body))
                    answer = r.json()
                except (httpx.HTTPError, ValueError) as e:
                    report.batch_answers[type(e).__name__] += 1
                    await asyncio.sleep(0.5)
                    continue
                if not isinstance(answer, dict):
                    answer = {}
                report.batch_answers[answer.get("status", str(r.status_code))] += 1
                if answer.get("status") == "RETRY":
                    await asyncio.sleep(min(int(r.headers.get("x-mics-next-msg-delay", "1000")) / 1000, 2.0))
                    continue
                report.batches += 1
                report.sent_items_in_success += answer.get("sent_items_in_success", 0)
                report.sent_items_in_error += answer.get("sent_items_in_error", 0)
                if answer.get("status") == "ERROR":
                    report.errors.append(f"batch_update ERROR: {answer.get('message')}")
                return
            report.errors.append(f"batch_update of {len(items)} {grouping_key} items kept failing: "
                                 f"{dict(report.batch_answers)}")

        queue: asyncio.Queue[int | None] = asyncio.Queue(maxsize=concurrency * 4)

        async def worker() -> None:
            while (i := await queue.get()) is not None:
                op = "DELETE" if rng.random() < delete_ratio else "UPSERT"
                body = {**base, "session_id": session_id, "ts": int(time.time() * 1000), "operation": op,
                        "user_identifiers": user_identifiers(i, rng), "user_profiles": []}
                r = None
                for _attempt in range(5):
                    try:
                        r = await client.post("/v1/user_segment_update", content=orjson.dumps(body))
                    except httpx.HTTPError as e:
                        report.update_answers[type(e).__name__] += 1
                        r = None
                        await asyncio.sleep(0.5)
                        continue
                    report.update_answers[r.status_code] += 1
                    if r.status_code != 429:
                        break
                    await asyncio.sleep(min(int(r.headers.get("x-mics-next-msg-delay", "1000")) / 1000, 2.0))
                if r is None or r.status_code == 429:
                    report.errors.append(f"user_segment_update of user {i} kept failing")
                elif r.status_code != 200:
                    report.errors.append(f"user_segment_update of user {i}: HTTP {r.status_code}")
                else:
                    full: list[tuple[str, list[Any]]] = []
                    async with batch_lock:
                        for item in r.json().get("data", []):
                            key = item["grouping_key"]
                            pending[key].append(orjson.dumps(item["content"]).decode())  # items as JSON strings
                            report.items += 1
                            report.items_by_operation[key] += 1
                            if len(pending[key]) >= batch_size:
                                full.append((key, pending.pop(key)))
                    for key, items in full:
                        await send_batch(key, items)
                if progress:
                    progress(1)

        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        for i in range(users):
            await queue.put(i)
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)
        for key, items in list(pending.items()):
            if items:
                await send_batch(key, items)
    report.seconds = time.perf_counter() - started
    return report
