"""The API's own enqueue writes the document Celery's send_task writes (kombu's Redis format)."""

import base64
import json
from typing import Any

from celery import Celery

from api.taskqueue import task_message

ARGS = [{"request_id": "req_1", "input_ids": [1, 2, 3], "sampling": {"max_tokens": 4}}]
# Differ per message (ids) or only matter to result backends, which the platform does not use.
VOLATILE_HEADERS = {"id", "root_id", "origin", "ignore_result"}
VOLATILE_PROPERTIES = {"correlation_id", "reply_to", "delivery_tag"}


def sent_by_celery(queue: str) -> dict[str, Any]:
    app = Celery("reference", broker="memory://")
    app.conf.task_serializer = "json"
    app.send_task("abl.generate", args=ARGS, queue=queue, routing_key=queue)
    with app.connection() as connection:
        return connection.default_channel._get(queue)


def comparable(message: dict[str, Any]) -> dict[str, Any]:
    return {
        **message,
        "body": json.loads(base64.b64decode(message["body"])),
        "headers": {k: v for k, v in message["headers"].items() if k not in VOLATILE_HEADERS},
        "properties": {
            k: v for k, v in message["properties"].items() if k not in VOLATILE_PROPERTIES
        },
    }


def test_message_matches_what_send_task_stores() -> None:
    ours = json.loads(task_message(Celery("api"), "abl.generate", ARGS, "abl.model.x"))
    theirs = sent_by_celery("abl.model.x")
    assert comparable(ours) == comparable(theirs)
    assert (
        ours["headers"]["id"] == ours["headers"]["root_id"] == ours["properties"]["correlation_id"]
    )
    assert ours["properties"]["delivery_info"] == {"exchange": "", "routing_key": "abl.model.x"}


def test_each_message_has_its_own_task_id_and_tag() -> None:
    app = Celery("api")
    one, two = (json.loads(task_message(app, "abl.generate", ARGS, "q")) for _ in range(2))
    assert one["headers"]["id"] != two["headers"]["id"]
    assert one["properties"]["delivery_tag"] != two["properties"]["delivery_tag"]
