"""rediss:// URLs: the TLS options Celery's broker and result backend get
from the URL, with the certificate checked unless the URL says otherwise."""

from __future__ import annotations

import ssl

import pytest
from celery import Celery

from segops_sync.celery import configure
from segops_sync.config import ConfigError, Settings, redis_tls_options


def test_a_rediss_url_without_parameters_checks_the_certificate() -> None:
    assert redis_tls_options("rediss://:pw@redis.internal:6379/0", "SEGOPS_BROKER_URL") == {
        "ssl_cert_reqs": ssl.CERT_REQUIRED
    }


def test_the_url_parameters_are_read_and_decoded() -> None:
    url = (
        "rediss://:pw@redis.internal:6379/0?ssl_ca_certs=%2Fetc%2Fsegops%2Fca.pem"
        "&ssl_certfile=/etc/segops/client.pem&ssl_keyfile=/etc/segops/client.key"
        "&ssl_cert_reqs=optional&unrelated=1"
    )
    assert redis_tls_options(url, "SEGOPS_BROKER_URL") == {
        "ssl_ca_certs": "/etc/segops/ca.pem",
        "ssl_certfile": "/etc/segops/client.pem",
        "ssl_keyfile": "/etc/segops/client.key",
        "ssl_cert_reqs": ssl.CERT_OPTIONAL,
    }


@pytest.mark.parametrize("url", ["redis://:pw@redis:6379/0", "amqp://guest:guest@rabbit//"])
def test_other_urls_get_no_tls_options(url: str) -> None:
    assert redis_tls_options(url, "SEGOPS_BROKER_URL") is None


def test_an_unknown_ssl_cert_reqs_names_the_variable_and_not_the_password() -> None:
    with pytest.raises(ConfigError) as caught:
        redis_tls_options(
            "rediss://:s3cret-pw@redis:6379/1?ssl_cert_reqs=CERT_MAYBE", "SEGOPS_RESULT_BACKEND"
        )
    message = str(caught.value)
    assert message.startswith("SEGOPS_RESULT_BACKEND: ssl_cert_reqs must be required")
    assert "s3cret-pw" not in message


def test_the_celery_app_gets_them_for_the_broker_and_the_result_backend() -> None:
    app = Celery("tls-config")
    configure(
        app,
        Settings(
            broker_url="rediss://:pw@redis:6379/0?ssl_ca_certs=/ca.pem",
            result_backend="rediss://:pw@redis:6379/1",
        ),
    )
    assert app.conf.broker_use_ssl == {
        "ssl_ca_certs": "/ca.pem",
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
    }
    assert app.conf.redis_backend_use_ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    plain = Celery("plain-config")
    configure(plain, Settings(broker_url="redis://:pw@redis:6379/0"))
    assert not plain.conf.broker_use_ssl and not plain.conf.redis_backend_use_ssl
