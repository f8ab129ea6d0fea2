"""Broker URLs with several hosts (the nodes of one cluster): parsing, and the settings
validation that turns a malformed one into a start-up error."""

from __future__ import annotations

import pydantic
import pytest

from mlpipe.broker.urls import BrokerUrl
from mlpipe.settings import Settings

CLUSTER = "amqp://guest:s3cret@10.0.0.1:5672,10.0.0.2:5673,rabbit-3/prod?heartbeat=30"


def test_one_host_is_used_exactly_as_written() -> None:
    for url in ("amqp://guest:guest@127.0.0.1:5672/", "amqp://localhost",
                "amqps://u:p%40ss@broker.example.com/%2F?heartbeat=5"):
        [host] = BrokerUrl.parse(url).hosts
        assert host.url == url


def test_several_hosts_split_into_single_host_urls_sharing_the_rest() -> None:
    parsed = BrokerUrl.parse(CLUSTER)
    assert parsed.addresses == ["10.0.0.1:5672", "10.0.0.2:5673", "rabbit-3:5672"]
    assert [h.url for h in parsed.hosts] == [
        "amqp://guest:s3cret@10.0.0.1:5672/prod?heartbeat=30",
        "amqp://guest:s3cret@10.0.0.2:5673/prod?heartbeat=30",
        "amqp://guest:s3cret@rabbit-3:5672/prod?heartbeat=30",
    ]


def test_default_ports_ipv6_and_odd_credentials() -> None:
    parsed = BrokerUrl.parse("amqps://u:p@ss,word@[::1]:5700,[fe80::1%25eth0],h/")
    assert parsed.addresses == ["[::1]:5700", "[fe80::1%25eth0]:5671", "h:5671"]
    # the last '@' ends the credentials: a ',' or '@' in the password is not a host
    assert parsed.hosts[2].url == "amqps://u:p@ss,word@h:5671/"
    assert BrokerUrl.parse("amqp://a, b ,c:1").addresses == ["a:5672", "b:5672", "c:1"]
    assert BrokerUrl.parse("AMQP://a,b").hosts[1].url == "amqp://b:5672"


@pytest.mark.parametrize(("url", "says"), [
    ("http://guest:guest@h/", "amqp:// or amqps://"),
    ("127.0.0.1:5672", "amqp:// or amqps://"),
    ("amqp://guest:guest@/vhost", "no host"),
    ("amqp://guest:guest@a:5672,,b/v", "host 2 of 3 is empty"),
    ("amqp://guest:guest@a,b,/v", "host 3 of 3 is empty"),
    ("amqp://guest:guest@a:99999,b/v", "port of host 1 of 2"),
    ("amqp://guest:guest@a:x/v", "port of host must be"),
    ("amqp://guest:guest@a:/v", "empty port"),
    ("amqp://guest:guest@a b/v", "not a host name"),
    ("amqp://guest:guest@[::1/v", "IPv6"),
    ("amqp://guest:guest@[::1]x,b/v", "after its ']'"),
    ("amqp://guest:guest@a:5672,A:5672/v", "A:5672 twice"),
    ("amqp://guest:guest@a,a:5672/v", "a:5672 twice"),
])
def test_malformed_urls_are_refused_without_echoing_the_password(url: str, says: str) -> None:
    with pytest.raises(ValueError, match="broker URL") as err:
        BrokerUrl.parse(url)
    assert says in str(err.value)
    assert "guest:guest" not in str(err.value)


def test_settings_accept_a_cluster_url_and_refuse_a_bad_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(broker_url=CLUSTER).broker_url == CLUSTER
    monkeypatch.setenv("MLPIPE_BROKER_URL", "amqp://g:g@n1:5672,n2:5672,n3:5672/")
    assert len(BrokerUrl.parse(Settings().broker_url).hosts) == 3
    monkeypatch.setenv("MLPIPE_BROKER_URL", "amqp://g:g@n1:5672,,n3:5672/")
    with pytest.raises(pydantic.ValidationError, match="host 2 of 3 is empty"):
        Settings()
