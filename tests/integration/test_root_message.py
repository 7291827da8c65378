"""A deploy's root message is pushed without Celery (``broker.task_message``): it must
be exactly what the installed Celery and kombu push for the same task, so a Celery
upgrade that changes the format fails here. That a worker runs it end to end is
every distributed test's business (they all enqueue through ``workflow.deploy``)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid

import pytest
import redis

from mailtls_tasks.distributed.broker import queue_for, task_message
from mailtls_tasks.distributed.workflow import readable
from tests.support.services import RedisServer

pytestmark = pytest.mark.integration


def _pushed(client: redis.Redis, queue: str) -> dict[str, object]:  # type: ignore[type-arg]
    raw = client.rpop(queue)
    assert raw is not None, f"nothing was pushed onto {queue}"
    assert client.llen(queue) == 0
    msg = json.loads(raw)
    msg["body"] = json.loads(base64.b64decode(msg["body"]))
    for random in ("reply_to", "delivery_tag"):  # fresh uuids in both, meaning nothing to the worker
        assert uuid.UUID(msg["properties"].pop(random))
    return msg  # type: ignore[no-any-return]


def test_hand_built_root_message_is_what_celery_sends(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    host = f"ghost-{uuid.uuid4().hex[:8]}"  # a queue no worker consumes
    queue = queue_for(host)
    kwargs = {"target": f"{host}/smtp", "host": host, "deploy_id": "20261127T000000-0123456789", "rollout": None}
    shown = readable(kwargs["target"], kwargs["deploy_id"])
    task_id = str(uuid.uuid4())

    # Sent by the Celery client app in a process of its own, as the client used to: in
    # this one the worker's task module is loaded (test collection), and Celery would
    # add its own time limits to the message -- which a worker applies anyway when the
    # message has none.
    send = ("import json, sys; from mailtls_tasks.distributed.app import client_app; a = json.loads(sys.argv[1]); "
            "client_app(a['url']).signature('mailtls.deploy', kwargs=a['kwargs']).set(argsrepr=a['shown'], "
            "kwargsrepr='').apply_async(ignore_result=True, task_id=a['id'])")
    subprocess.run([sys.executable, "-c", send, json.dumps({"url": redis_server.url, "kwargs": kwargs,
                                                            "shown": shown, "id": task_id})], check=True)
    by_celery = _pushed(client, queue)
    by_celery["headers"]["origin"] = by_celery["headers"]["origin"].split("@")[1]  # type: ignore[index]
    client.lpush(queue, task_message("mailtls.deploy", kwargs, queue, shown, task_id=task_id))
    by_hand = _pushed(client, queue)
    by_hand["headers"]["origin"] = by_hand["headers"]["origin"].split("@")[1]  # type: ignore[index]  # gen<pid>@

    assert by_hand == by_celery
    assert by_hand["headers"]["task"] == "mailtls.deploy"  # type: ignore[index]
    assert by_hand["body"][1] == kwargs  # type: ignore[index]


def test_the_deploy_client_does_not_load_celery_kombu_or_pydantic() -> None:
    """The client's whole job is one message and a wait: loading Celery for it cost a
    tenth of a second per deploy (and the result model loads only after the send)."""
    code = ("import sys; from mailtls_tasks.distributed import workflow; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('celery', 'kombu', 'pydantic')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
