"""The API key never appears in a log record, an exception's text or repr, or any object's repr."""

from __future__ import annotations

import logging
import pickle
import traceback

import httpx
import pytest

from segops_sync.klaviyo import (
    CredentialsRejected,
    InvalidRequest,
    KlaviyoClient,
    KlaviyoError,
    ProfileInput,
    TransientError,
)

from .conftest import Env

HTTP_LOGGERS = ("httpx", "httpcore", "httpcore.connection", "httpcore.http11", "segops_sync")


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    for name in HTTP_LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def everything_about(exc: BaseException) -> str:
    return "\n".join(
        [
            str(exc),
            repr(exc),
            "".join(traceback.format_exception(exc)),
            repr(exc.__dict__),
            str(exc.__cause__),
            str(exc.__context__),
        ]
    )


def test_key_is_in_no_log_record_and_no_exception(
    env: Env, debug_logs: pytest.LogCaptureFixture
) -> None:
    key = env.key
    client = env.client()
    texts = [repr(client), str(client), repr(vars(client)), repr(client._http.headers)]

    # success paths: the key goes out on every request
    client.get_list(env.list_id)
    job = client.create_bulk_import_job([ProfileInput(email="k@example.com")], env.list_id).id
    client.get_bulk_import_job(job)
    client.find_profile_ids("email", ["k@example.com"])
    texts.append(repr(client.last_rate_limit))

    # every failure path
    failures: list[KlaviyoError] = []

    def expect_failure(call: object) -> None:
        try:
            call()  # type: ignore[operator]
        except KlaviyoError as exc:
            failures.append(exc)
        else:
            raise AssertionError("expected a KlaviyoError")

    expect_failure(lambda: client.get_list("nope00"))
    expect_failure(lambda: client.create_bulk_import_job([ProfileInput(email="bad")], env.list_id))
    env.sim.force_429(1, 0.01)
    expect_failure(lambda: client.get_list(env.list_id))
    for faults in ({"error_rate": 1.0}, {"challenge_rate": 1.0}, {"drop_rate": 1.0}):
        env.sim.set_faults(**faults)
        expect_failure(lambda: client.get_list(env.list_id))
    env.sim.set_faults(latency=0.3)
    slow = env.client(timeout=httpx.Timeout(0.05))
    expect_failure(lambda: slow.get_list(env.list_id))
    env.sim.set_faults()
    env.sim.revoke_key(key)
    expect_failure(lambda: client.get_list(env.list_id))
    assert len(failures) == 8

    texts += [everything_about(exc) for exc in failures]
    texts += [pickle.loads(pickle.dumps(exc)).detail for exc in failures]
    texts += [record.getMessage() for record in debug_logs.records]
    texts += [repr(record.__dict__) for record in debug_logs.records]
    assert any("HTTP Request" in t for t in texts), "httpx logging was not captured"
    assert any("send_request_headers" in t for t in texts), "httpcore logging was not captured"
    for text in texts:
        assert key not in text
        assert key[3:] not in text
    # nor in anything the simulator recorded
    assert key not in repr(env.sim.requests()) and key not in repr(env.sim.stats())


def test_key_echoed_by_a_server_is_scrubbed() -> None:
    key = "pk_" + "s3cr3t" * 6

    def handler(request: httpx.Request) -> httpx.Response:
        echoed = request.headers["authorization"]
        return httpx.Response(
            400,
            headers={"content-type": "application/vnd.api+json"},
            json={
                "errors": [
                    {
                        "id": "1",
                        "code": "invalid",
                        "title": f"Bad {echoed}",
                        "detail": f"API key {key} is not valid",
                        "source": {"pointer": "/data"},
                    }
                ]
            },
        )

    client = KlaviyoClient(key, transport=httpx.MockTransport(handler))
    with client, pytest.raises(CredentialsRejected) as caught:  # 400 naming the API key
        client.get_list("AbC123")
    assert key not in everything_about(caught.value)
    assert key not in repr(caught.value.errors)


def test_key_inside_a_transport_error_is_scrubbed() -> None:
    key = "pk_" + "t0ps3cr3t" * 4

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(
            f"proxy refused {request.headers['authorization']}", request=request
        )

    client = KlaviyoClient(key, transport=httpx.MockTransport(handler))
    with client, pytest.raises(TransientError) as caught:
        client.get_account_id()
    assert key not in everything_about(caught.value)
    assert caught.value.__cause__ is None  # the httpx exception (which holds the request) is gone


def test_a_key_unfit_for_a_header_is_refused_without_echo() -> None:
    key = "pk_abc\ndef-secret-tail"
    with pytest.raises(ValueError) as caught:
        KlaviyoClient(key)
    assert "secret-tail" not in str(caught.value)


def test_exceptions_survive_pickling_with_their_fields() -> None:
    original = InvalidRequest("bad", status=400)
    copy = pickle.loads(pickle.dumps(original))
    assert (type(copy), copy.detail, copy.status) == (InvalidRequest, "bad", 400)
