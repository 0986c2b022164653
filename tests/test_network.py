"""The network check answers within its time limit, whatever the resolver does."""
import socket
import time

from selagg_utils.weights import network


def test_a_hanging_name_lookup_counts_as_unreachable_within_the_limit(monkeypatch):
    def hang(*args, **kwargs):
        time.sleep(30)

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.perf_counter()
    assert network.reachable("huggingface.co", timeout=0.5) is False
    assert time.perf_counter() - start < 2


def test_a_refused_connection_is_unreachable_and_an_open_one_reachable():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        assert network.reachable("127.0.0.1", port=port, timeout=2) is True
    finally:
        server.close()
    assert network.reachable("127.0.0.1", port=port, timeout=2) is False


def test_offline_mode_is_read_from_either_variable(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("SELAGG_OFFLINE", raising=False)
    assert not network.offline_mode()
    monkeypatch.setenv("SELAGG_OFFLINE", "yes")
    assert network.offline_mode()
    monkeypatch.setenv("SELAGG_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert network.offline_mode()
