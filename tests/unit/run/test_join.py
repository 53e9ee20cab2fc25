"""The control channel on loopback, with real sockets: the handshake's answers and refusals, and
each side learning at once that the other's supervisor is gone."""

from __future__ import annotations

import socket

import pytest
from ft_appliance.run.join import JobServer, JoinFailed, join

from tests.helpers import wait_for


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nothing() -> None:
    return None


@pytest.fixture
def server():
    lines: list[str] = []
    s = JobServer(port(), "tok", 3, lines.append).start()
    s.lines = lines  # type: ignore[attr-defined]
    yield s
    s.close()


def test_nodes_join_hear_the_token_and_each_side_sees_the_other_go(server: JobServer) -> None:
    heard = []
    links = [join("127.0.0.1", server.port, k, lambda t, n: heard.append((t, n)), 5, nothing) for k in (1, 2)]
    server.wait_all(5, nothing, first=True)
    assert heard == [("tok", 3), ("tok", 3)] and sorted(server.joined) == [1, 2]
    assert all(link.token == "tok" and link.head_alive() for link in links)
    links[0].close()  # node 1's supervisor goes away
    wait_for(lambda: server.missing() == [1], 5, what="node 1 gone")
    assert "node 1 left the job (its supervisor is gone)" in server.lines  # type: ignore[attr-defined]
    server.close()  # the head's supervisor goes away: node 2 sees it
    wait_for(lambda: not links[1].head_alive(), 5, what="the head gone")


def test_a_refusal_ends_the_heads_first_wait_with_the_nodes_reason(server: JobServer) -> None:
    with pytest.raises(JoinFailed) as err:
        join("127.0.0.1", server.port, 2, lambda t, n: ("no shared volume here", 8), 5, nothing)
    assert err.value.message == "no shared volume here" and err.value.exit_code == 8
    with pytest.raises(JoinFailed) as head:
        server.wait_all(5, nothing, first=True)
    assert head.value.message == "node 2 refused to join: no shared volume here" and head.value.exit_code == 8


def test_the_head_gives_up_on_missing_nodes_in_one_line(server: JobServer) -> None:
    link = join("127.0.0.1", server.port, 1, lambda t, n: None, 5, nothing)  # held: dropping it leaves the job
    wait_for(lambda: server.missing() == [2], 5, what="node 1 joined")
    with pytest.raises(JoinFailed) as err:
        server.wait_all(0.5, nothing, first=False)
    assert "node(s) 2 of 3 did not join within 0 s" in err.value.message
    link.close()


def test_a_taken_control_port_is_one_line(server: JobServer) -> None:
    with pytest.raises(JoinFailed) as err:
        JobServer(server.port, "t2", 2, lambda m: None).start()
    assert (
        f"cannot listen on its control port {server.port}" in err.value.message
        and "--control-port" in err.value.message
    )


def test_no_head_is_one_line_after_the_timeout() -> None:
    with pytest.raises(JoinFailed) as err:
        join("127.0.0.1", port(), 1, lambda t, n: None, 1.5, nothing)
    assert "cannot reach the head node at 127.0.0.1" in err.value.message and err.value.exit_code == 8
