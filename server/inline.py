"""``InlineGrid``: a Flower Grid that runs a ClientApp in this process, one node after the other.

For tests (the strategy's two phases with real client code, no Ray, no network) and for the quick
``fedmerge simulate --backend inline``. A client that raises answers with an error message, as in the
Flower runtime; a client that takes longer than the timeout is treated as not having answered.
"""
from __future__ import annotations

import time
import uuid
from typing import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

__all__ = ["InlineGrid"]


def _ensure_task_identity() -> None:
    """Messages created outside the Flower runtime need a run identity (the runtime sets it per process)."""
    from flwr.supercore.task_identity import TaskIdentity

    if TaskIdentity._run_id is None:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


class InlineGrid(Grid):
    def __init__(self, client_app, num_nodes: int, run_config: dict | None = None,
                 node_config: Callable[[int], dict] | None = None, first_node_id: int = 1001):
        self.client_app = client_app
        _ensure_task_identity()
        self.node_ids = [first_node_id + 7 * i for i in range(num_nodes)]
        cfg = node_config or (lambda i: {"partition-id": i, "num-partitions": num_nodes})
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config=dict(cfg(i)), state=RecordDict(),
                                      run_config=dict(run_config or {}))
                         for i, nid in enumerate(self.node_ids)}
        self.down: set[int] = set()
        self._run = None
        self._replies: dict[str, Message] = {}
        self.sent: list[Message] = []

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.node_ids if n not in self.down]

    def _deliver(self, msg: Message, deadline: float | None) -> Message | None:
        node = msg.metadata.dst_node_id
        if node not in self.contexts or node in self.down:
            return None
        t = time.time()
        try:
            reply = self.client_app(msg, self.contexts[node])
        except Exception as exc:  # noqa: BLE001 - the runtime turns client exceptions into error replies
            reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
        if deadline is not None and time.time() > deadline:
            log(30, "node %d answered after the timeout (%.1f s); reply dropped", node, time.time() - t)
            return None
        log(20, "node %d (%d of %d) answered %s in %.1f s%s", node, self.node_ids.index(node) + 1,
            len(self.node_ids), msg.metadata.message_type, time.time() - t,
            " with an error" if reply.has_error() else "")
        reply.metadata.__dict__["_src_node_id"] = node
        return reply

    def _stamp(self, msg: Message) -> None:
        """What the runtime sets on a message it pushes: id, source (the server) and run."""
        msg.metadata.__dict__.update({"_message_id": uuid.uuid4().hex, "_src_node_id": 0, "_run_id": 1})
        self.sent.append(msg)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            self._stamp(msg)
            reply = self._deliver(msg, None)
            if reply is not None:
                self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        out = []
        for msg in messages:
            self._stamp(msg)
            deadline = None if timeout is None else time.time() + timeout
            reply = self._deliver(msg, deadline)
            if reply is not None:
                out.append(reply)
        return out
