"""Broker URLs with several hosts (the nodes of one cluster): parsing, the settings
validation that turns a malformed one into a start-up error, and the order in which the
connection supervisor tries the hosts (against ports where nothing listens)."""

from __future__ import annotations

import pydantic
import pytest
import structlog.testing

from mlpipe.broker.connection import Backoff, BrokerConnection
from mlpipe.broker.urls import BrokerUrl
from mlpipe.settings import Settings
from mlpipe.testing import wait_for

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
    monkeypatch.setenv("MLPIPE_BROKER_URL", "amqp://g:s3cret@n1:5672,,n3:5672/")
    with pytest.raises(pydantic.ValidationError, match="host 2 of 3 is empty") as err:
        Settings()
    assert "s3cret" not in str(err.value), "the error would put the password in the logs"


async def test_the_supervisor_tries_each_host_in_turn_and_counts_rounds() -> None:
    """Nothing listens on these ports: every connect is refused at once. One attempt (for the
    backoff, ``failed_attempts`` and the producer's circuit breaker) is a round over all
    hosts; each round starts after the host tried last, so every host gets its turn."""
    hosts = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
    supervisor = BrokerConnection(f"amqp://g:g@{','.join(hosts)}/", name="test-rounds",
                                  backoff=Backoff(0.01, 0.02))
    with structlog.testing.capture_logs() as logs:
        await supervisor.start(wait=False)
        try:
            await wait_for(lambda: supervisor.failed_attempts >= 2, timeout=10,
                           message="two failed rounds")
        finally:
            await supervisor.close()
    tried = [e["host"] for e in logs if e["event"] == "amqp.host_unreachable"][:6]
    start = hosts.index(tried[0])
    assert tried == [hosts[(start + i) % 3] for i in range(6)]
    rounds = [e for e in logs if e["event"] == "amqp.connect_failed"]
    assert [e["attempt"] for e in rounds[:2]] == [1, 2]
    assert all(h in rounds[0]["error"] for h in hosts)
    assert supervisor.host is None


def test_connections_start_on_a_random_host() -> None:
    """A fleet started at once spreads over the cluster instead of all dialling node 1."""
    url = "amqp://g:g@n1,n2,n3/"
    firsts = {BrokerConnection(url, name="t")._cursor for _ in range(60)}
    assert firsts == {0, 1, 2}
