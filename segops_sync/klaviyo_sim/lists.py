"""Lists and their members: setup, GET and POST /api/lists, GET /api/lists/{id}, the member
reads and the relationship writes (add and remove, which never touch a profile or its consent)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from segops_sync.klaviyo.endpoints import Endpoint
from segops_sync.klaviyo_sim.base import SimState
from segops_sync.klaviyo_sim.ids import short_id
from segops_sync.klaviyo_sim.profiles import norm_email, profile_resource
from segops_sync.klaviyo_sim.responses import (
    cursor_int,
    error_item,
    error_response,
    errors_response,
    iso,
    ok_response,
    page_links,
    query_filter,
    self_link,
)
from segops_sync.klaviyo_sim.state import (
    AccountRecord,
    Ctx,
    ListRecord,
    Reject,
    SimHttpResponse,
    SimProfile,
)

MAX_RELATIONSHIP_IDS = 1_000
# GET /api/lists: "Default: 10. Min: 1. Max: 10." (the spec's page[size])
LISTS_PAGE_SIZE = 10
_LISTS_SORTS = {"created", "id", "name", "updated"}


class ListsMixin(SimState):
    def create_list(
        self,
        account_id: str,
        name: str = "List",
        *,
        list_id: str | None = None,
        opt_in_process: str = "double_opt_in",
    ) -> str:
        if opt_in_process not in ("double_opt_in", "single_opt_in"):
            raise ValueError("opt_in_process must be double_opt_in or single_opt_in")
        with self._lock:
            self._account(account_id)
            list_id = list_id or self._fresh(lambda: short_id(self._rng), self._lists)
            if list_id in self._lists:
                raise ValueError(f"list {list_id} exists")
            self._lists[list_id] = ListRecord(
                list_id, account_id, name, datetime.now(UTC), opt_in_process=opt_in_process
            )
            return list_id

    def remove_from_list(self, list_id: str, profile_ids: Iterable[str]) -> None:
        """Someone takes profiles off the list in Klaviyo's UI (no request, no rate limit)."""
        with self._lock:
            lst = self._list(list_id)
            for pid in profile_ids:
                lst.members.pop(pid, None)
            lst.changes += 1

    def add_to_list(self, list_id: str, profile_ids: Iterable[str]) -> None:
        """Someone puts profiles on the list in Klaviyo's UI (no request, no rate limit)."""
        with self._lock:
            lst = self._list(list_id)
            for pid in profile_ids:
                if pid not in self._profile_index:
                    raise KeyError(f"unknown profile {pid}")
            self._add_members(lst, profile_ids)

    def list_member_ids(self, list_id: str) -> set[str]:
        with self._lock:
            self._advance(self._clock())
            return set(self._list(list_id).members)

    def on_list(self, list_id: str, identities: Iterable[str]) -> dict[str, bool]:
        """For each email or external_id: is its profile on the list? (Cheap on a big list.)"""
        with self._lock:
            self._advance(self._clock())
            lst = self._list(list_id)
            account = self._account(lst.account_id)
            answer: dict[str, bool] = {}
            for ident in identities:
                pid = account.by_email.get(norm_email(ident)) or account.by_external_id.get(ident)
                answer[ident] = pid is not None and pid in lst.members
            return answer

    def list_members(self, list_id: str) -> list[SimProfile]:
        with self._lock:
            self._advance(self._clock())
            members = self._list(list_id).members
            ordered = sorted(members, key=members.__getitem__)
            return [self._profile_index[pid].snapshot() for pid in ordered]

    def _add_members(self, lst: ListRecord, profile_ids: Iterable[str]) -> None:
        for pid in profile_ids:
            if pid not in lst.members:
                self._join_seq += 1
                lst.members[pid] = self._join_seq
        lst.changes += 1

    def _owned_list(self, ctx: Ctx, list_id: str) -> ListRecord:
        lst = self._lists.get(list_id)  # case-sensitive, like Klaviyo's ids
        if lst is None or ctx.account is None or lst.account_id != ctx.account.id:
            raise Reject(error_response(404, detail=f"A list with id {list_id} does not exist."))
        return lst

    def _h_get_list(self, ctx: Ctx, params: dict[str, str], body: Any) -> SimHttpResponse:
        lst = self._owned_list(ctx, params["id"])
        extra = ctx.query.get("additional-fields[list]")
        if extra is not None and set(extra.split(",")) != {"profile_count"}:
            raise Reject(
                error_response(
                    400, detail="Invalid additional-fields.", parameter="additional-fields[list]"
                )
            )
        resource = _list_resource(ctx, lst)
        if extra is not None:  # billed to the XS tier (throttling._bucket)
            resource["attributes"]["profile_count"] = len(lst.members)
        return ok_response({"data": resource, "links": {"self": self_link(ctx)}})

    def _h_get_lists(self, ctx: Ctx, params: dict[str, str], body: Any) -> SimHttpResponse:
        """GET /api/lists: the account's lists, 10 a page at most, filtered by id or name."""
        account = ctx.account
        assert account is not None
        raw = ctx.query.get("page[size]", str(LISTS_PAGE_SIZE))
        size = int(raw) if raw.isdigit() else 0
        if not 1 <= size <= LISTS_PAGE_SIZE:
            raise Reject(
                error_response(
                    400,
                    detail=f"page[size] must be an integer from 1 to {LISTS_PAGE_SIZE}.",
                    parameter="page[size]",
                )
            )
        size = min(size, self.page_size_cap) if self.page_size_cap else size
        sort = ctx.query.get("sort", "id")
        if sort.removeprefix("-") not in _LISTS_SORTS:
            raise Reject(error_response(400, detail="Invalid sort.", parameter="sort"))
        lists = [lst for lst in self._lists.values() if lst.account_id == account.id]
        if "filter" in ctx.query:
            filt = query_filter(ctx, {"id", "name"})
            wanted = set(filt.values)
            lists = [lst for lst in lists if getattr(lst, filt.field) in wanted]
        key = sort.removeprefix("-")
        lists.sort(
            key=lambda lst: (
                (lst.created, lst.id)
                if key in ("created", "updated")
                else (
                    getattr(lst, key),
                    lst.id,
                )
            ),
            reverse=sort.startswith("-"),
        )
        start = cursor_int(ctx)  # choice: an offset; Klaviyo's cursors are opaque
        page = lists[start : start + size]
        nxt = str(start + size) if start + size < len(lists) else None
        data = [_list_resource(ctx, lst) for lst in page]
        return ok_response({"data": data, "links": page_links(ctx, nxt)})

    def _h_create_list(self, ctx: Ctx, params: dict[str, str], body: Any) -> SimHttpResponse:
        """POST /api/lists (the body passed ListCreateQuery). choice: a name already taken is
        accepted, as Klaviyo's UI lets two lists share a name (not confirmed for the API)."""
        account = ctx.account
        assert account is not None
        attrs = body["data"]["attributes"]
        name = attrs["name"]
        if not name.strip():
            raise Reject(
                error_response(
                    400, detail="The list name may not be blank.", pointer="/data/attributes/name"
                )
            )
        list_id = self.create_list(
            account.id, name, opt_in_process=attrs.get("opt_in_process") or "double_opt_in"
        )
        resource = _list_resource(ctx, self._lists[list_id])
        return ok_response({"data": resource, "links": {"self": resource["links"]["self"]}}, 201)

    def _h_list_member_ids(self, ctx: Ctx, params: dict[str, str], body: Any) -> SimHttpResponse:
        lst = self._owned_list(ctx, params["id"])
        size = self._page_size(ctx)
        after = cursor_int(ctx)
        wanted: set[str] | None = None
        if "filter" in ctx.query:
            account = ctx.account
            assert account is not None
            wanted = self._filtered_members(ctx, account)
        if ctx.query.get("sort") not in (None, "joined_group_at", "-joined_group_at"):
            raise Reject(error_response(400, detail="Invalid sort.", parameter="sort"))
        rows = _in_join_order(lst, after, wanted, size + 1)
        page = rows[:size]
        data = [{"type": "profile", "id": pid} for _, pid in page]
        nxt = str(page[-1][0]) if len(rows) > size else None
        return ok_response({"data": data, "links": page_links(ctx, nxt)})

    def _filtered_members(self, ctx: Ctx, account: AccountRecord) -> set[str]:
        """The profiles a list read filtered by email may answer: Klaviyo filters on the same
        index as GET /api/profiles, so a profile it has not indexed yet is not found."""
        filt = query_filter(ctx, {"email"})
        found = (account.by_email.get(e) for e in map(norm_email, filt.values))
        return {pid for pid in found if pid and account.profiles[pid].visible_at <= ctx.now}

    def _h_list_members(self, ctx: Ctx, params: dict[str, str], body: Any) -> SimHttpResponse:
        """GET /api/lists/{id}/profiles: full profiles in join order (cursor = join sequence)."""
        lst = self._owned_list(ctx, params["id"])
        account = ctx.account
        assert account is not None
        size = self._page_size(ctx)
        after = cursor_int(ctx)
        wanted: set[str] | None = None
        if "filter" in ctx.query:
            wanted = self._filtered_members(ctx, account)
        if ctx.query.get("sort") not in (None, "joined_group_at", "-joined_group_at"):
            raise Reject(error_response(400, detail="Invalid sort.", parameter="sort"))
        extra = ctx.query.get("additional-fields[profile]")
        if extra is not None and extra not in ("subscriptions", "predictive_analytics"):
            raise Reject(error_response(400, detail="Invalid additional-fields.", parameter=extra))
        rows = _in_join_order(lst, after, wanted, size + 1)
        page = rows[:size]
        data = [profile_resource(ctx, self._profile_index[pid]) for _, pid in page]
        nxt = str(page[-1][0]) if len(rows) > size else None
        return ok_response({"data": data, "links": page_links(ctx, nxt)})

    def _h_relationship(self, ctx: Ctx, params: dict[str, str], body: Any) -> SimHttpResponse:
        lst = self._owned_list(ctx, params["id"])
        entries: list[dict[str, Any]] = body["data"]
        if not entries:
            raise Reject(
                error_response(400, detail="At least one profile is required.", pointer="/data")
            )
        if len(entries) > MAX_RELATIONSHIP_IDS:
            raise Reject(
                error_response(
                    400,
                    detail=f"At most {MAX_RELATIONSHIP_IDS} profiles may be sent per request.",
                    pointer="/data",
                )
            )
        account = ctx.account
        assert account is not None
        bad = [(i, e["id"]) for i, e in enumerate(entries) if e["id"] not in account.profiles]
        if bad:
            # One bad id fails the whole call (Segment's fixture shows the same).
            listed = ", ".join(pid for _, pid in bad[:20])
            raise Reject(
                errors_response(
                    400,
                    [
                        error_item(
                            400, detail=f"Invalid profile IDs: {listed}", pointer=f"/data/{i}/id"
                        )
                        for i, _ in bad
                    ],
                )
            )
        ids = [e["id"] for e in entries]
        if ctx.endpoint == Endpoint.ADD_LIST_PROFILES:
            self._add_members(lst, ids)
        else:
            for pid in ids:
                lst.members.pop(pid, None)  # the profile itself (and its consent) stays
            lst.changes += 1
        return SimHttpResponse(204, {})


def _list_resource(ctx: Ctx, lst: ListRecord) -> dict[str, Any]:
    base = f"{ctx.req.base_url}/api/lists/{lst.id}"
    return {
        "type": "list",
        "id": lst.id,
        "attributes": {
            "name": lst.name,
            "created": iso(lst.created),
            "updated": iso(lst.created),
            "opt_in_process": lst.opt_in_process,
        },
        "relationships": {
            rel: {"links": {"self": f"{base}/relationships/{rel}", "related": f"{base}/{rel}"}}
            for rel in ("profiles", "tags", "flow-triggers")
        },
        "links": {"self": base},
    }


def _in_join_order(
    lst: ListRecord, after: int, wanted: set[str] | None, limit: int
) -> list[tuple[int, str]]:
    """Up to ``limit`` (join sequence, profile id) of the list's members joined after ``after``,
    in join order; only those ``wanted`` when filtered. A filtered read looks up its (at most
    100) profiles instead of scanning the list: a churn's email lookups on a list of a million
    would otherwise cost the simulator a million steps each."""
    if wanted is not None:
        members = lst.members
        found = sorted(
            (members[pid], pid) for pid in wanted if pid in members and members[pid] > after
        )
        return found[:limit]
    return lst.joined_after(after, limit)
