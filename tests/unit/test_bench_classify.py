"""The bench's split of a MONITOR capture into Celery's commands and ours: the
evidence behind P3's Redis budget, so it must not count one as the other."""

from __future__ import annotations

from typing import Any

from bench.__main__ import _classify


def cmd(port: str, command: str, kind: str = "tcp") -> dict[str, Any]:
    return {"client_address": "127.0.0.1" if kind == "tcp" else "lua", "client_port": port,
            "client_type": kind, "command": command}


def test_transactions_count_whole_for_their_owner_even_when_interleaved() -> None:
    capture = [
        cmd("1", "MULTI"),                                   # kombu: a delivery's ack emulation
        cmd("2", "MULTI"),                                   # ours: record + envelope + root message
        cmd("1", "ZADD unacked_index 1.0 tag"),
        cmd("2", "SET mailtls:deploy:x {}"),
        cmd("1", "HSET unacked tag [...]"),
        cmd("2", "SET mailtls:envelope:x {}"),
        cmd("2", "LPUSH mailtls.mx {...}"),
        cmd("1", "EXEC"),
        cmd("2", "EXEC"),
    ]
    assert _classify(capture) == {"celery": 4, "mailtls": 5, "connection": 0}


def test_single_commands_by_key_channel_and_script() -> None:
    capture = [
        cmd("3", "BRPOP mailtls.mx mailtls.mx\\x06\\x163 1"),   # a queue name has a dot, not a colon
        cmd("4", "PUBLISH /0.celeryev/task.multi {...}"),
        cmd("5", "PUBLISH mailtls:ended:x {...}"),
        cmd("5", "EVALSHA abc 2 mailtls:deploy:x mailtls:ended:x"),
        cmd("", "GET mailtls:deploy:x", kind="lua"),          # inside our script
        cmd("5", "GET mailtls:deploy:x"),
        cmd("6", "PING"),
        cmd("6", "HELLO 3"),
    ]
    assert _classify(capture) == {"celery": 2, "mailtls": 4, "connection": 2}
