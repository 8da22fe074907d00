"""Task arguments as everyone but the task sees them: masked.

A task's arguments travel beyond the task: Celery publishes a text copy of them (``argsrepr``,
``kwargsrepr``) in the message headers and in the ``task-sent`` / ``task-received`` events that
Flower shows and keeps, ``celery inspect`` prints them, and with ``result_extended`` the result
backend stores them with any result it stores. ``segops.context_identified`` carries a user id
(often an email) and every trait of a person, and comes from producers we do not control, so
the copy in their message cannot be trusted: the worker writes its own.

- :class:`MaskingRequest` (``SegopsTask.Request``): the worker's request of every task. Its
  ``argsrepr`` / ``kwargsrepr`` (events, inspect, logs) are rebuilt from the arguments, masked;
  the exception and traceback of ``task-failed`` / ``task-retried`` events are masked like log
  lines; and a member-data task never stores a result, whatever its message asks for, so the
  backend never copies its arguments.
- :class:`MaskingAMQP` (the app's ``amqp``): every message our processes publish (the CLI, a
  retry, a re-sent message of a lost worker) carries masked reprs, and so do its
  ``task-sent`` events.
"""

from __future__ import annotations

from typing import Any

from celery.app.amqp import AMQP
from celery.utils.saferepr import saferepr
from celery.worker.request import Request

from segops_sync.observability.logging import MASK, mask_member_data

# Tasks whose every argument is member data: a user id may be an email, traits are profile data.
MEMBER_DATA_TASKS = frozenset({"segops.context_identified", "segops.forget_user"})
# Event fields that quote what failed (an exception's text may hold a SQL row or an email).
_EVENT_TEXT_FIELDS = ("exception", "traceback", "result")


# A shown copy is at most this long, as Celery's producers cut theirs (argsrepr_maxsize). It is
# masked at twice that length, then cut: an address across the cut was masked whole first.
REPR_MAX = 1024


def _shown(value: Any) -> str:
    return mask_member_data(saferepr(value, maxlen=2 * REPR_MAX))[:REPR_MAX]


def masked_reprs(name: str, args: Any, kwargs: Any) -> tuple[str, str]:
    """(argsrepr, kwargsrepr) safe to show: a member-data task shows only its argument names;
    any other (ids only) shows its arguments with whatever looks like member data masked."""
    if name in MEMBER_DATA_TASKS:
        positional = [MASK] * len(args) if isinstance(args, list | tuple) else MASK
        named = {str(k)[:64]: MASK for k in kwargs} if isinstance(kwargs, dict) else MASK
        return _shown(positional), _shown(named)
    return _shown(args if args is not None else ()), _shown(kwargs if kwargs is not None else {})


class MaskingRequest(Request):  # type: ignore[misc]
    """The worker's request of one task message, showing masked arguments only."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        argsrepr, kwargsrepr = masked_reprs(self._type, self._args, self._kwargs)
        self._argsrepr, self._kwargsrepr = argsrepr, kwargsrepr
        # the pool process logs and retries from the request dict: the producer's copy goes
        self._request_dict["argsrepr"], self._request_dict["kwargsrepr"] = argsrepr, kwargsrepr
        if self._type in MEMBER_DATA_TASKS and self._task.ignore_result:
            # a message may ask for its result to be stored (and with it, its arguments)
            self._request_dict["ignore_result"] = True
            self._ignore_result = True

    def send_event(self, type: str, **fields: Any) -> None:
        for name in _EVENT_TEXT_FIELDS:
            value = fields.get(name)
            if isinstance(value, str):
                fields[name] = mask_member_data(value)
        super().send_event(type, **fields)

    def info(self, safe: bool = False) -> dict[str, Any]:
        """``celery inspect reserved`` / ``scheduled`` (Flower's worker pages) ask for the real
        arguments: they get the masked ones, as ``active`` does."""
        shown: dict[str, Any] = super().info(safe=True)
        return shown


class MaskingAMQP(AMQP):  # type: ignore[misc]
    """Every task message this app publishes carries masked ``argsrepr`` / ``kwargsrepr``."""

    def as_task_v2(
        self,
        task_id: str,
        name: str,
        args: Any = None,
        kwargs: Any = None,
        *rest: Any,
        **options: Any,
    ) -> Any:
        options["argsrepr"], options["kwargsrepr"] = masked_reprs(name, args, kwargs)
        return super().as_task_v2(task_id, name, args, kwargs, *rest, **options)
