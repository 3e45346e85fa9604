"""Approximate time synchronisation of several topics.

``message_filters.ApproximateTimeSynchronizer`` is used when importable; otherwise
:class:`ApproximateSync`, a small pure-Python equivalent: each input keeps a bounded queue of
recent messages; when a message arrives, the combination of it with the closest message of each
other input is emitted (once) when all stamps lie within ``slop`` seconds of each other. Only the
emitted messages leave the queues: an older message whose partner is still in flight stays until
the partner arrives or it falls off its bounded queue (counted in ``unmatched``), so messages that
arrive out of order across topics (a multi-threaded executor, a fast replay) still pair up.
Callbacks do constant work per message (queues are short), so they never block.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable, Sequence

from sas_core.data.msg_codec import stamp_to_seconds


def _stamp(msg) -> float:
    header = getattr(msg, "header", None)
    return stamp_to_seconds(header.stamp if header is not None else msg)


class ApproximateSync:
    """Match messages of ``n_inputs`` streams by header stamp within ``slop`` seconds.

    Call :meth:`add(i, msg)` from input i's subscription callback; ``callback(*msgs)`` runs for each
    matched set (in the caller's thread).
    """

    def __init__(self, n_inputs: int, callback: Callable, queue_size: int = 10, slop: float = 0.05):
        if n_inputs < 1:
            raise ValueError("need at least one input")
        self.n = n_inputs
        self.callback = callback
        self.slop = float(slop)
        self.queues = [deque(maxlen=max(1, queue_size)) for _ in range(n_inputs)]
        self._lock = threading.Lock()
        self.matched = 0
        self.unmatched = 0  # messages that fell off a full queue without a partner

    def add(self, index: int, msg) -> None:
        with self._lock:
            q = self.queues[index]
            if len(q) == q.maxlen:
                self.unmatched += 1
            q.append((_stamp(msg), msg))
            match = self._find(index)
        if match is not None:
            self.matched += 1
            self.callback(*match)

    def _find(self, index: int):
        if any(not q for q in self.queues):
            return None
        t_new, _ = self.queues[index][-1]
        chosen = []
        for j, q in enumerate(self.queues):
            if j == index:
                chosen.append(len(q) - 1)
                continue
            best = min(range(len(q)), key=lambda k: abs(q[k][0] - t_new))
            if abs(q[best][0] - t_new) > self.slop:
                return None
            chosen.append(best)
        stamps = [self.queues[j][k][0] for j, k in enumerate(chosen)]
        if max(stamps) - min(stamps) > self.slop:
            return None
        msgs = [self.queues[j][k][1] for j, k in enumerate(chosen)]
        for j, k in enumerate(chosen):  # only the used messages leave (older ones may still pair)
            del self.queues[j][k]
        return msgs


def make_synchronizer(node, subscriptions: Sequence, callback: Callable, queue_size: int = 10,
                      slop: float = 0.05):
    """Synchronise ``subscriptions`` = [(msg_type, topic, qos), ...] of ``node``.

    Returns an object that keeps the subscriptions alive. Uses message_filters when importable.
    """
    try:  # pragma: no cover - depends on the ROS install
        import message_filters

        subs = [message_filters.Subscriber(node, t, topic, qos_profile=qos) for t, topic, qos in subscriptions]
        sync = message_filters.ApproximateTimeSynchronizer(subs, queue_size, slop)
        sync.registerCallback(callback)
        return (subs, sync)
    except ImportError:
        sync = ApproximateSync(len(subscriptions), callback, queue_size, slop)
        subs = [node.create_subscription(t, topic, (lambda m, i=i: sync.add(i, m)), qos)
                for i, (t, topic, qos) in enumerate(subscriptions)]
        sync.subscriptions = subs
        return sync
