"""The rate limits as a client meets them: the limiter's verdict per account and endpoint, 429s
with Retry-After, RateLimit-* headers, forced 429s, and what tests count (early retries, rates)."""

from __future__ import annotations

from segops_sync.klaviyo.endpoints import Endpoint
from segops_sync.klaviyo_sim.base import SimState
from segops_sync.klaviyo_sim.published import ENDPOINT_LIMITS, PROFILE_COUNT, RateLimit
from segops_sync.klaviyo_sim.ratelimit import Decision, format_seconds
from segops_sync.klaviyo_sim.responses import error_response
from segops_sync.klaviyo_sim.state import Ctx, SimHttpResponse


class RateLimitsMixin(SimState):
    @property
    def burst_window(self) -> float:
        return self._limiter.burst_seconds

    @property
    def steady_window(self) -> float:
        return self._limiter.steady_seconds

    def count_429(self) -> int:
        with self._lock:
            return sum(1 for r in self._requests if r.status == 429)

    def early_retries(self) -> int:
        with self._lock:
            return sum(1 for r in self._requests if r.early_retry)

    def max_rate(self, account_id: str, endpoint: Endpoint, window_seconds: float) -> int:
        """Most requests (of any outcome) that account sent to that endpoint within any sliding
        window of window_seconds (compressed seconds: use burst_window / steady_window)."""
        with self._lock:
            times = sorted(
                r.time for r in self._requests if r.account == account_id and r.endpoint == endpoint
            )
        best, lo = 0, 0
        for hi, t in enumerate(times):
            while t - times[lo] >= window_seconds:
                lo += 1
            best = max(best, hi - lo + 1)
        return best

    def force_429(self, count: int, retry_after: float) -> None:
        """The next ``count`` authenticated API requests get 429 with this Retry-After."""
        with self._lock:
            self._forced_429.extend([retry_after] * count)

    def _admit(self, ctx: Ctx) -> SimHttpResponse | None:
        """The rate limiter and forced 429s; None means the request may go on."""
        assert ctx.account is not None and ctx.endpoint is not None
        if self._forced_429:
            return self._throttle(ctx, self._forced_429.pop(0))
        bucket, limit = _bucket(ctx)
        decision = self._limiter.acquire(
            (ctx.account.id, bucket),
            limit,
            ctx.now,
            enforce=self.enforce_rate_limits,
        )
        if not decision.allowed:
            assert decision.retry_after is not None
            return self._throttle(ctx, decision.retry_after)
        return None

    def _throttle(self, ctx: Ctx, retry_after: float) -> SimHttpResponse:
        assert ctx.account is not None and ctx.endpoint is not None
        key = (ctx.account.id, ctx.endpoint)
        self._not_before[key] = max(self._not_before.get(key, 0.0), ctx.now + retry_after)
        text = format_seconds(retry_after)
        response = error_response(
            429, detail=f"Request was throttled. Expected available in {text} seconds."
        )
        response.headers["retry-after"] = text  # and no RateLimit-* headers, as Klaviyo
        return response

    def _is_early(self, ctx: Ctx) -> bool:
        if ctx.account is None or ctx.endpoint is None:
            return False
        not_before = self._not_before.get((ctx.account.id, ctx.endpoint))
        return not_before is not None and ctx.now < not_before

    def _with_limits(self, ctx: Ctx, response: SimHttpResponse) -> SimHttpResponse:
        if ctx.account is None or ctx.endpoint is None:
            return response
        bucket, limit = _bucket(ctx)
        state: Decision = self._limiter.peek((ctx.account.id, bucket), limit, ctx.now)
        response.headers["ratelimit-limit"] = str(state.steady_limit)
        response.headers["ratelimit-remaining"] = str(state.steady_remaining)
        response.headers["ratelimit-reset"] = format_seconds(state.steady_reset)
        return response


def _bucket(ctx: Ctx) -> tuple[str, RateLimit]:
    """The limit a request counts against: its endpoint's, except that a list read asking for
    profile_count is billed to a tier of its own (XS), as Klaviyo's spec says."""
    assert ctx.endpoint is not None
    if ctx.endpoint == Endpoint.GET_LIST and "profile_count" in ctx.query.get(
        "additional-fields[list]", ""
    ):
        return f"{ctx.endpoint.value} profile_count", PROFILE_COUNT
    return ctx.endpoint.value, ENDPOINT_LIMITS[ctx.endpoint]
