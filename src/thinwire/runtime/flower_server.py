"""The server side of thinwire on Flower: the round engine (runtime/engine.py) over Flower
messages. Nodes are discovered and admitted by a hello (`refusal`), and each round's downloads go
out as `train.thinwire_fit` messages to the node of each client's partition (runtime/flower.py
describes the protocol)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from thinwire.config import Config, to_toml
from thinwire.methods.validate import check_examples
from thinwire.runtime import engine
from thinwire.runtime.engine import Arrival, Transport
from thinwire.runtime.flower_wire import (BASE_DIGEST, CLIENT_TIMINGS, FINGERPRINT, FIT, HELLO, META, METRICS,
                                          PARTITION_ID, PAYLOAD, POLL_S, RUN_KEY, SECAGG, config_digest, flower_bytes,
                                          pack, round_timeout, short_reason, unpack)
from thinwire.seeding import random_fingerprint

@dataclass
class _Link:
    """What the server knows of the federation's nodes: partition (client id) -> node id."""

    grid: Grid
    hello: RecordDict
    timeout_s: float
    nodes: dict[int, int] = field(default_factory=dict)
    flower_bytes: int = 0
    # what a node must match to join (`refusal`): the base weights' digest, and the random
    # fingerprint where the method rebuilds state from shared seeds
    expected: dict[str, str] = field(default_factory=dict)
    warn: Callable[[str], None] = print

    def discover(self, wanted: set[int], wait: bool) -> None:
        """Ask nodes not yet mapped which partition they own; with `wait`, until all of `wanted`
        are mapped or the round timeout passes (nodes may still be connecting)."""
        deadline = time.monotonic() + self.timeout_s
        asked: set[int] = set()
        while True:
            online = set(self.grid.get_node_ids())
            self.nodes = {cid: node for cid, node in self.nodes.items() if node in online}
            fresh = sorted(online - set(self.nodes.values()) - asked)
            if fresh:
                asked.update(fresh)
                messages = [Message(self.hello, dst_node_id=node, message_type=HELLO, ttl=self.timeout_s)
                            for node in fresh]
                self.flower_bytes += sum(flower_bytes(m) for m in messages)
                replies, _ = exchange(self.grid, messages, max(1.0, deadline - time.monotonic()))
                for reply in replies.values():
                    if reply.has_error():
                        log(logging.WARNING, "node %s refused the hello: %s", reply.metadata.src_node_id,
                            reply.error.reason)
                        continue
                    self._adopt(reply)
            if wanted <= self.nodes.keys() or not wait or time.monotonic() >= deadline:
                return
            time.sleep(1.0)

    def _adopt(self, reply: Message) -> None:
        self.flower_bytes += flower_bytes(reply)
        node = reply.metadata.src_node_id
        try:
            cid = int(reply.content[META][PARTITION_ID])
        except (KeyError, TypeError, ValueError):
            log(logging.WARNING, "node %s sent a malformed hello reply", node)
            return
        reason = refusal(dict(reply.content[META]), self.expected)
        if reason is not None:
            self.warn(f"the node of partition {cid} was refused: {reason}")
            return
        if cid in self.nodes and self.nodes[cid] != node:
            self.warn(f"nodes {self.nodes[cid]} and {node} both claim partition {cid}; keeping the first "
                      "(start every SuperNode with its own partition-id, and use node authentication)")
            return
        self.nodes[cid] = node

    def forget(self, cid: int) -> None:
        self.nodes.pop(cid, None)


def refusal(hello: dict[str, Any], expected: dict[str, str]) -> str | None:
    """Why a node whose hello reply is `hello` may not join (None: it may)."""
    if BASE_DIGEST in expected and hello.get(BASE_DIGEST) != expected[BASE_DIGEST]:
        return "its base model's weights differ from the server's (another checkpoint or model.name)"
    if FINGERPRINT in expected and hello.get(FINGERPRINT) != expected[FINGERPRINT]:
        return ("it draws other random bits from the same seeds (its torch kernels differ: set "
                "ATEN_CPU_CAPABILITY alike on every machine), so its replica would drift from the server's")
    return None


def exchange(grid: Grid, messages: list[Message], timeout_s: float) -> tuple[dict[int, Message], set[int]]:
    """Push `messages`, pull replies until all arrived or `timeout_s` passed.

    Returns the replies by index into `messages`, and the indices whose push failed.
    (Grid.send_and_receive polls every 3 s on a deployment; this polls every 0.25 s.)
    """
    ids = list(grid.push_messages(messages))
    failed = {i for i, mid in enumerate(ids) if not mid}
    waiting = {mid: i for i, mid in enumerate(ids) if mid}
    replies: dict[int, Message] = {}
    deadline = time.monotonic() + timeout_s
    while waiting:
        for reply in grid.pull_messages(list(waiting)):
            index = waiting.pop(reply.metadata.reply_to_message_id, None)
            if index is not None:
                replies[index] = reply
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    return replies, failed


def serve(grid: Grid, config: Config, out: Path, quiet: bool = True, runtime: str = "flower",
          resume: bool = False) -> dict[str, Any]:
    """The ServerApp's whole run (the round engine over Flower messages); writes the run
    directory and returns the summary. `resume=True` continues `<out>.partial` from its checkpoint."""
    return engine.run(config, out, FlowerTransport(grid, config), quiet=quiet, resume=resume, runtime=runtime)


class FlowerTransport(Transport):
    """Downloads as `train.thinwire_fit` messages to the node of each client's partition; the
    replies that arrive by `federation.round_timeout_s`."""

    name = "flower"

    def __init__(self, grid: Grid, config: Config):
        self.grid, self.config = grid, config
        self.timeout_s = round_timeout(config)
        self.text = to_toml(config)
        self.digest = config_digest(self.text)
        self.flower_down = self.flower_up = 0
        self.control_mark = 0

    def bind(self, ctx: Any, federation: Any, progress: Any, run_dir: Any) -> None:
        self.run_key = run_dir.run_key
        hello = ConfigRecord({"config": self.text, "config-sha": self.digest, RUN_KEY: self.run_key})
        self.link = _Link(self.grid, RecordDict({META: hello}), self.timeout_s, warn=ctx.warn)

    def start(self, server: Any) -> None:
        """Ask every node which partition it owns; refuse those that could not follow the run."""
        clients = self.config.federation.clients
        self.link.expected[BASE_DIGEST] = server.ctx.workbench.base_digest  # the model devices start from
        if server.needs_shared_draws:
            self.link.expected[FINGERPRINT] = random_fingerprint()
        self.link.discover(set(range(clients)), wait=True)
        missing = sorted(set(range(clients)) - self.link.nodes.keys())
        log(logging.INFO, "thinwire: %d of %d partitions have a node%s", len(self.link.nodes), clients,
            f" (missing: {missing})" if missing else "")
        self.control_mark = self.link.flower_bytes

    def exchange(self, rnd: int, downloads: dict[int, bytes]) -> tuple[dict[int, Arrival], float]:
        link = self.link
        if not downloads.keys() <= link.nodes.keys():
            link.discover(set(downloads), wait=False)
        arrivals: dict[int, Arrival] = {}
        messages, targets, sent = [], [], {}
        for cid, down in downloads.items():
            if cid not in link.nodes:
                arrivals[cid] = Arrival(failure="no SuperNode owns this partition", delivered=False)
                continue
            content = RecordDict({PAYLOAD: pack(down), META: ConfigRecord(
                {"round": rnd, "client": cid, "config-sha": self.digest, RUN_KEY: self.run_key})})
            message = Message(content, dst_node_id=link.nodes[cid], message_type=FIT, group_id=str(rnd),
                              ttl=self.timeout_s)
            messages.append(message)
            targets.append(cid)
            sent[cid] = flower_bytes(message)
            del content
        t0 = time.perf_counter()
        replies, push_failed = exchange(self.grid, messages, self.timeout_s) if messages else ({}, set())
        took = time.perf_counter() - t0
        del messages
        self.flower_down += sum(sent[cid] for index, cid in enumerate(targets) if index not in push_failed)
        self.flower_up += sum(flower_bytes(reply) for reply in replies.values())
        for index, cid in enumerate(targets):
            reply = replies.pop(index, None)  # drop each reply's bytes once read
            arrivals[cid] = self._arrival(cid, reply, index in push_failed, sent[cid])
            if arrivals[cid].failure is not None:
                link.forget(cid)  # ask its node again when next sampled (it may have restarted)
        return arrivals, took

    def control(self, rnd: int, stage: str, messages: dict[int, bytes]) -> dict[int, bytes | str]:
        """A SecAgg+ stage as `query.thinwire_secagg` messages; Flower's bytes count as control."""
        link = self.link
        replies: dict[int, bytes | str] = {}
        outgoing, targets = [], []
        for cid, data in messages.items():
            if cid not in link.nodes:
                replies[cid] = "no SuperNode owns this partition"
                continue
            content = RecordDict({PAYLOAD: pack(data), META: ConfigRecord({"round": rnd, "client": cid,
                                                                            "stage": stage})})
            outgoing.append(Message(content, dst_node_id=link.nodes[cid], message_type=SECAGG, group_id=str(rnd),
                                    ttl=self.timeout_s))
            targets.append(cid)
        got, push_failed = exchange(self.grid, outgoing, self.timeout_s) if outgoing else ({}, set())
        link.flower_bytes += sum(flower_bytes(m) for m in outgoing) + sum(flower_bytes(r) for r in got.values())
        for index, cid in enumerate(targets):
            reply = got.get(index)
            if index in push_failed:
                replies[cid] = "the SuperLink did not accept the message"
            elif reply is None:
                replies[cid] = f"no reply within {self.timeout_s:g} s"
            elif reply.has_error():
                replies[cid] = short_reason(reply.error.reason)
            else:
                try:
                    if int(reply.content[META]["client"]) != cid:
                        raise ValueError("reply for another client")
                    replies[cid] = unpack(reply.content[PAYLOAD])
                except Exception as exc:  # a malformed reply costs that client's part
                    replies[cid] = f"malformed reply: {exc}"
        return replies

    def _arrival(self, cid: int, reply: Message | None, push_failed: bool, flower_down: int) -> Arrival:
        if push_failed:
            return Arrival(failure="the SuperLink did not accept the message", delivered=False)
        if reply is None:
            return Arrival(failure=f"no reply within {self.timeout_s:g} s")
        if reply.has_error():
            log(logging.DEBUG, "thinwire: client %d error: %s", cid, reply.error.reason)
            return Arrival(failure=f"{short_reason(reply.error.reason)} (Flower error code {reply.error.code})")
        up = None
        try:
            up = unpack(reply.content[PAYLOAD])  # bytes that arrived count, malformed or not
            meta = reply.content[META]
            if int(meta["client"]) != cid:
                raise ValueError(f"reply is for client {meta['client']}")
            metrics = dict(reply.content[METRICS]) if METRICS in reply.content else {}
            # the client's own timings are its claims: kept with its metrics and validated as they are
            metrics.update({key: meta[field] for field, key in CLIENT_TIMINGS.items() if field in meta})
            examples = check_examples(meta["num-examples"])  # the in-process rule: no coercion
            measured = {"node": reply.metadata.src_node_id, "flower_downlink_bytes": flower_down,
                        "flower_uplink_bytes": flower_bytes(reply)}
        except Exception as exc:  # a malformed reply costs that client, not the run
            return Arrival(up=up, failure=f"malformed reply: {exc}")
        return Arrival(up=up, num_examples=examples, metrics=metrics, measured=measured)

    def state(self) -> tuple[None, dict]:
        return None, {}  # every client's state lives on its node (`ClientStore`)

    def restore(self, client: Any, states: dict) -> None:
        pass

    def round_fields(self) -> dict[str, Any]:
        fields = {"flower_downlink_bytes": self.flower_down, "flower_uplink_bytes": self.flower_up,
                  "flower_control_bytes": self.link.flower_bytes - self.control_mark}
        self.flower_down = self.flower_up = 0
        self.control_mark = self.link.flower_bytes
        return fields

    def summary_fields(self, rounds: list[dict[str, Any]]) -> dict[str, Any]:
        return {"flower_downlink_bytes_total": sum(r.get("flower_downlink_bytes", 0) for r in rounds),
                "flower_uplink_bytes_total": sum(r.get("flower_uplink_bytes", 0) for r in rounds),
                "flower_control_bytes_total": self.link.flower_bytes,
                "failures_total": sum(len(r["failures"]) for r in rounds)}
