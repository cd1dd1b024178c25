"""Fan-out R-Fork with peer assist: the seed's swarm registry, and real clients trading weights over Mooncake TCP."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from sglang.srt.remote_instance.mooncake_guard import mooncake_available
from sglang.srt.remote_instance.peer_registry import PeerRegistry
from sglang.srt.server_args import ServerArgs, ServerArgsError
from sglang.test.rfork_utils import bootstrap_server, greedy_ids, rank_checksums, te_client_args, weights_by_name
from sglang.test.test_utils import config_only_copy, find_free_port, kill_process_tree, popen_launch_server

KEY = "peer-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ENV = {"MC_LOG_LEVEL": "WARNING"}
SMALL_KV = ["--max-total-tokens", "4096"]
GREEDY = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
PROMPT = "Three forks of one seed should agree on"
PEERS = "/remote_instance_peers"

needs_mooncake = pytest.mark.skipif(not mooncake_available(), reason="mooncake-transfer-engine is not installed")


def announcement(peer_id: str = "p1", **extra: object) -> dict:
    return {"rank": 0, "peer_id": peer_id, "session_id": "127.0.0.1:15001", "protocol": "tcp", **extra}


@pytest.fixture
def bootstrap():
    with bootstrap_server(KEY) as (url, server):
        yield f"{url}{PEERS}", server


def test_registry_announce_refresh_and_list(bootstrap):
    url, _ = bootstrap
    first = requests.put(url, json=announcement(addrs=[4096, 8192, 0], have="5"), headers=AUTH, timeout=5)
    assert first.status_code == 200 and first.json()["seq"] == 0
    second = requests.put(url, json=announcement("p2", addrs=[1, 2, 3]), headers=AUTH, timeout=5)
    assert second.json()["seq"] == 1
    # A refresh without addresses keeps the announced ones and keeps the join number.
    again = requests.put(url, json=announcement(have="7", done=True), headers=AUTH, timeout=5)
    assert again.json()["seq"] == 0
    peers = requests.get(url, params={"rank": 0}, headers=AUTH, timeout=5).json()["peers"]
    by_id = {p["peer_id"]: p for p in peers}
    assert by_id["p1"]["addrs"] == [4096, 8192, 0] and by_id["p1"]["have"] == "7" and by_id["p1"]["done"]
    assert by_id["p2"]["have"] == "" and not by_id["p2"]["done"]
    # Seed claims: a bitmap like 'have'; an entry that never sent one (an older client) claims nothing.
    assert by_id["p1"]["claims"] == "" and by_id["p2"]["claims"] == ""
    assert requests.put(url, json=announcement("p2", have="1", claims="06"), headers=AUTH, timeout=5).status_code == 200
    peers = requests.get(url, params={"rank": 0, "addrs": 0}, headers=AUTH, timeout=5).json()["peers"]
    assert {p["peer_id"]: p["claims"] for p in peers} == {"p1": "", "p2": "6"}
    peers = requests.get(url, params={"rank": 0}, headers=AUTH, timeout=5).json()["peers"]
    by_id = {p["peer_id"]: p for p in peers}
    brief = requests.get(url, params={"rank": 0, "addrs": 0}, headers=AUTH, timeout=5).json()["peers"]
    assert [{k: v for k, v in p.items() if k != "age_s"} for p in brief] == [
        {k: v for k, v in p.items() if k not in ("age_s", "addrs")} for p in peers
    ]
    assert requests.get(url, params={"rank": 1}, headers=AUTH, timeout=5).json()["peers"] == []


def test_registry_refuses_what_could_hurt_the_seed(bootstrap):
    url, _ = bootstrap
    put = lambda body, **kw: requests.put(url, json=body, headers=kw.get("headers", AUTH), timeout=5)  # noqa: E731
    assert put(announcement(addrs=[1]), headers={}).status_code == 401
    assert requests.get(url, params={"rank": 0}, timeout=5).status_code == 401
    assert put(announcement()).status_code == 404  # unknown peer, no addresses: nothing to serve from
    assert put(announcement(addrs=[-1])).status_code == 400
    assert put(announcement(addrs=[1 << 64])).status_code == 400
    assert put(announcement(addrs=["0x10"])).status_code == 400
    assert put(announcement(addrs=[1, 2], have="fff")).status_code == 400  # more bits than tensors
    assert put(announcement(addrs=[1], have="xyz")).status_code == 400
    assert put(announcement(addrs=[1, 2], claims="1f")).status_code == 400  # more bits than tensors
    assert put(announcement(addrs=[1], claims="-1")).status_code == 400
    assert put(announcement(addrs=[1], claims=3)).status_code == 400
    assert put(announcement("bad id!", addrs=[1])).status_code == 400
    assert put(announcement(addrs=[1], protocol="carrier-pigeon")).status_code == 400
    assert put(announcement(addrs=[1], session_id="x" * 300)).status_code == 400
    assert put({**announcement(addrs=[1]), "rank": True}).status_code == 400
    assert put([1, 2]).status_code == 400
    raw = requests.put(url, data=b"{", headers=AUTH, timeout=5)
    assert raw.status_code == 400 and "not JSON" in raw.text
    assert requests.get(url, params={"rank": "x"}, headers=AUTH, timeout=5).status_code == 400
    # Nothing refused above was stored.
    assert requests.get(url, params={"rank": 0}, headers=AUTH, timeout=5).json()["peers"] == []


def test_registry_entries_expire_and_are_bounded(monkeypatch):
    registry = PeerRegistry(ttl=0.2)
    registry.put(announcement(addrs=[1]))
    assert b'"p1"' in registry.get(0)
    time.sleep(0.3)
    assert b'"p1"' not in registry.get(0)
    from sglang.srt.remote_instance import peer_registry

    for i in range(peer_registry.MAX_PEERS_PER_RANK):
        registry.put(announcement(f"q{i}", addrs=[1]))
    with pytest.raises(peer_registry.PeerRequestError) as full:
        registry.put(announcement("one-too-many", addrs=[1]))
    assert full.value.status == 429
    # The addresses of all entries together are bounded too (a refresh may keep its own).
    monkeypatch.setattr(peer_registry, "MAX_TOTAL_TENSORS", 10)
    small = PeerRegistry()
    small.put(announcement("a", addrs=list(range(6))))
    small.put(announcement("a", addrs=list(range(8))))
    with pytest.raises(peer_registry.PeerRequestError, match="full"):
        small.put(announcement("b", addrs=list(range(3))))
    assert small.put(announcement("b", addrs=[1, 2]))["seq"] == 1


def test_peer_assist_flag_needs_transfer_engine(tiny_model_dir):
    common = dict(
        model_path=tiny_model_dir("llama"),
        load_format="remote_instance",
        remote_instance_weight_loader_seed_instance_ip="127.0.0.1",
        remote_instance_weight_loader_seed_instance_service_port=1,
        remote_instance_weight_loader_peer_assist=True,
    )
    with pytest.raises(ServerArgsError, match="peer-assist works over TransferEngine only"):
        ServerArgs(**common, remote_instance_weight_loader_send_weights_group_ports=[1])
    assert not ServerArgs(model_path=tiny_model_dir("llama")).remote_instance_weight_loader_peer_assist


def client_args(seed_url: str, *extra: str) -> list[str]:
    return te_client_args(seed_url, "--remote-instance-weight-loader-peer-assist", *SMALL_KV, *extra, timeout=60)


def checksums(url: str) -> dict[str, str]:
    return rank_checksums(url, 1)[0]


def weights(url: str, names: list[str]) -> dict[str, list]:
    return weights_by_name(url, names)


def greedy(url: str) -> list[int]:
    return greedy_ids(url, PROMPT, GREEDY)


def peer_report(url: str) -> dict:
    report = requests.get(f"{url}/get_server_info", timeout=30).json()["fork_report"]
    return report["peer_assist"]


@pytest.fixture(scope="module")
def seed(tiny_model_dir):
    args = ["--remote-instance-weight-loader-start-seed-via-transfer-engine",
            "--engine-info-bootstrap-port", str(find_free_port()), *SMALL_KV]  # fmt: skip
    proc = popen_launch_server(tiny_model_dir("llama"), other_args=args, env=ENV)
    yield proc
    kill_process_tree(proc.pid)


@needs_mooncake
def test_seed_http_server_passes_registry_requests_on(seed):
    url = f"{seed.base_url}{PEERS}"
    assert requests.get(url, params={"rank": 0}, timeout=5).json() == {"rank": 0, "peers": [], "ttl_s": 15.0}
    assert requests.get(url, params={"rank": 0, "addrs": 0}, timeout=5).json()["peers"] == []
    refused = requests.put(url, json=announcement(addrs=[1], protocol="smoke-signals"), timeout=5)
    assert refused.status_code == 400 and "'protocol' must be one of" in refused.json()["error"]["message"]
    assert requests.get(url, timeout=5).status_code == 400  # no rank


@needs_mooncake
def test_three_clients_at_once_trade_weights(seed, tiny_model_dir, tmp_path):
    # One tensor per batch and a short pause after each, so that forks running side by side overlap.
    env = {**ENV, "SGLANG_RFORK_PEER_BATCH_TENSORS": "1", "SGLANG_RFORK_PEER_TEST_READ_DELAY_S": "0.05"}
    dirs = [config_only_copy(tiny_model_dir("llama"), tmp_path / f"c{i}") for i in range(3)]
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(popen_launch_server, d, None, 300, client_args(seed.base_url), env) for d in dirs]
        clients = [f.result() for f in futures]
    try:
        expected = checksums(seed.base_url)
        reference = weights(seed.base_url, list(expected))
        answer = greedy(seed.base_url)
        reports = []
        for client in clients:
            assert checksums(client.base_url) == expected
            assert weights(client.base_url, list(expected)) == reference
            assert greedy(client.base_url) == answer
            reports.append(peer_report(client.base_url))
        total = sum(r["seed_bytes"] + r["peer_bytes"] for r in reports)
        assert all(r["seed_bytes"] + r["peer_bytes"] == total // 3 for r in reports)
        assert len({r["join_seq"] for r in reports}) == 3
        assert any(r["peer_bytes"] > 0 for r in reports), reports
        # Without peer assist the seed sends three copies. With it, about one while the three transfers overlap
        # (each leaves to the others what they read from the seed); a client that starts only after another has
        # forked reads part from the seed (the seed is then one source among the peers), up to 1 + 1/2 + 1/3
        # copies when a loaded machine starts them one after the other. Before seed claims, overlapping
        # transfers had the seed send ~1.8 copies here.
        seed_copies = sum(r["seed_bytes"] for r in reports) / (total // 3)
        windows = [requests.get(f"{c.base_url}/get_server_info", timeout=30).json()["fork_report"] for c in clients]
        windows = [w["backend_window_unix_s"] for w in windows]
        overlapped = max(w[0] for w in windows) < min(w[1] for w in windows)
        assert seed_copies <= (1.5 if overlapped else 2.0), (seed_copies, windows, reports)
        assert all(not r["dropped_sources"] and not r["tensors_reread_after_bad_checksum"] for r in reports)
        log = Path(clients[0].log_path).read_text(errors="replace")
        assert re.search(r"peer assist: bytes by source: .*seed \d+", log)
    finally:
        for client in clients:
            kill_process_tree(client.pid)


@needs_mooncake
def test_peer_killed_mid_read(seed, tiny_model_dir, tmp_path):
    # A forks and stays as a full source; B reads from it and the seed slowly (one tensor per 0.7 s from each) and A
    # dies meanwhile.
    model = tiny_model_dir("llama")
    a = popen_launch_server(config_only_copy(model, tmp_path / "a"), other_args=client_args(seed.base_url), env=ENV)
    a_label = f"peer#{peer_report(a.base_url)['join_seq']} "
    log = tmp_path / "b.log"
    url = f"http://127.0.0.1:{find_free_port()}"
    command = [sys.executable, "-m", "sglang.launch_server", "--model-path", config_only_copy(model, tmp_path / "b"),
               "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], *client_args(seed.base_url)]  # fmt: skip
    slow = {**os.environ, **ENV, "SGLANG_RFORK_PEER_BATCH_TENSORS": "1", "SGLANG_RFORK_PEER_TEST_READ_DELAY_S": "0.7"}
    with open(log, "w") as out:
        b = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=slow)
    try:
        deadline = time.monotonic() + 240
        while f"peer assist: reading from {a_label}" not in log.read_text(errors="replace"):
            assert b.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.05)
        time.sleep(1.0)  # B has read a tensor or two from A, and has a dozen left
        kill_process_tree(a.pid)
        while not _healthy(url):
            assert b.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        report = peer_report(url)
        assert checksums(url) == checksums(seed.base_url)
        assert greedy(url) == greedy(seed.base_url)
        assert report["bytes_by_source"][next(k for k in report["bytes_by_source"] if k.startswith(a_label))] > 0
        assert report["seed_bytes"] > 0, report
        assert any(k.startswith(a_label) for k in report["dropped_sources"]), report
        assert f"dropping source {a_label}" in log.read_text(errors="replace")
    finally:
        kill_process_tree(a.pid)
        kill_process_tree(b.pid)


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


@needs_mooncake
def test_bytes_from_a_lying_peer_are_read_again_from_the_seed(seed, tiny_model_dir, tmp_path):
    import torch

    from sglang.srt.remote_instance.mooncake_guard import GuardedEngine

    # A real Mooncake peer that claims to hold every tensor verified but serves other bytes (ones, not the weights);
    # it says it is still forking, so the client leaves the seed what the liar does not claim to hold: nothing.
    info = requests.get(f"{seed.base_url}/remote_instance_transfer_engine_info", params={"rank": 0}, timeout=30)
    sizes = [n * size for _, n, size in info.json()["remote_instance_transfer_engine_info"][1].values() if n]
    fakes = [torch.ones(n, dtype=torch.uint8) for n in sizes]
    liar = GuardedEngine("127.0.0.1", "tcp")
    liar.register([(t.data_ptr(), t.numel()) for t in fakes], "*")
    body = announcement("liar", session_id=liar.session_id, addrs=[t.data_ptr() for t in fakes],
                        have=f"{(1 << len(fakes)) - 1:x}")  # fmt: skip
    assert requests.put(f"{seed.base_url}{PEERS}", json=body, timeout=5).status_code == 200
    env = {**ENV, "SGLANG_RFORK_PEER_BATCH_TENSORS": "1"}
    client = popen_launch_server(
        config_only_copy(tiny_model_dir("llama"), tmp_path / "c"), other_args=client_args(seed.base_url), env=env
    )
    try:
        report = peer_report(client.base_url)
        assert checksums(client.base_url) == checksums(seed.base_url)
        assert greedy(client.base_url) == greedy(seed.base_url)
        liar_label = next(k for k in report["bytes_by_source"] if liar.session_id in k)
        assert report["bytes_by_source"][liar_label] == 0 and liar_label in report["dropped_sources"]
        assert "fail the seed's checksums" in report["dropped_sources"][liar_label]
        assert report["tensors_reread_after_bad_checksum"] > 0
    finally:
        kill_process_tree(client.pid)
        liar.close()


def test_board_leaves_the_seed_what_no_peer_holds_and_moves_work_off_failed_sources():
    import torch

    from sglang.srt.model_loader.peer_sources import BatchLimit, Item, Source, WorkBoard

    items = [Item(i, f"t{i}", torch.zeros(4), 16, 0, "x") for i in range(6)]
    board = WorkBoard(items, [3, 4, 5, 0, 1, 2], BatchLimit(32, 16))  # two tensors per batch
    seed = Source("seed", "s", [0] * 6, is_seed=True)
    peer = Source("peer", "p", [0] * 6, is_seed=False, have=0b000011)
    board.add(seed)
    board.add(peer)
    # 0 and 1: the peer has them. It may well be about to read 2 and 3 too, so the seed reader starts further on.
    assert [it.index for it in board.claim(seed, 0)] == [4, 5]
    assert [it.index for it in board.claim(seed, 0)] == [2, 3]
    assert [it.index for it in board.claim(peer, 0)] == [0, 1]
    assert board.claim(seed, 0) == [] and board.claim(peer, 0) == []
    # The peer's bytes for 0 are wrong: it is dropped, 0 goes to the seed, 1 (still claimed by it) is released.
    board.complete(peer, [], [items[0]])
    assert peer.failed and "fail the seed's checksums" in peer.failed
    assert sorted(it.index for it in board.claim(seed, 0)) == [0, 1]
    board.complete(seed, [items[i] for i in (0, 1, 2, 3, 4, 5)], [])
    assert board.finished and seed.bytes_read == 96 and peer.bytes_read == 0
    # Once every peer it knows has forked, the seed is one source among the others.
    done_peer = Source("done", "d", [0] * 6, is_seed=False, have=0b111111, done=True)
    board = WorkBoard(items, list(range(6)), BatchLimit(32, 16))
    board.add(seed)
    board.add(done_peer)
    assert [it.index for it in board.claim(seed, 0)] == [0, 1]
    assert [it.index for it in board.claim(done_peer, 0)] == [2, 3]


@needs_mooncake
def test_seed_killed_mid_read_without_peers_fails_fast(tiny_model_dir, tmp_path):
    args = ["--remote-instance-weight-loader-start-seed-via-transfer-engine",
            "--engine-info-bootstrap-port", str(find_free_port()), *SMALL_KV]  # fmt: skip
    victim = popen_launch_server(tiny_model_dir("llama"), other_args=args, env=ENV)
    log = tmp_path / "c.log"
    command = [sys.executable, "-m", "sglang.launch_server", "--model-path",
               config_only_copy(tiny_model_dir("llama"), tmp_path / "c"), "--port", str(find_free_port()),
               *client_args(victim.base_url)]  # fmt: skip
    slow = {**os.environ, **ENV, "SGLANG_RFORK_PEER_BATCH_TENSORS": "1", "SGLANG_RFORK_PEER_TEST_READ_DELAY_S": "0.5"}
    with open(log, "w") as out:
        client = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=slow)
    try:
        deadline = time.monotonic() + 240
        while "and its peers (join #0" not in log.read_text(errors="replace"):
            assert client.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.05)
        kill_process_tree(victim.pid)
        killed = time.monotonic()
        assert client.wait(timeout=60) != 0
        assert time.monotonic() - killed < 30
        text = log.read_text(errors="replace")
        assert f"R-Fork from seed {victim.base_url[7:]} failed at step 'transfer'" in text
    finally:
        kill_process_tree(victim.pid)
        kill_process_tree(client.pid)


def _claim_board(seq: int | None, peer_seq: int | None = 1, done: bool = False, n: int = 8):
    import torch

    from sglang.srt.model_loader.peer_sources import BatchLimit, Item, Source, WorkBoard

    items = [Item(i, f"t{i}", torch.zeros(4), 16, 0, "x") for i in range(n)]
    board = WorkBoard(items, list(range(n)), BatchLimit(16, 16))  # one tensor per batch, three planned after it
    board.seq = seq
    seed = Source("seed", "s", [0] * n, is_seed=True)
    peer = Source("peer", "p", [0] * n, is_seed=False, seq=peer_seq, done=done)
    board.add(seed)
    board.add(peer)
    return board, seed, peer, items


def test_board_leaves_what_a_forking_peer_claimed_from_the_seed_to_it():
    board, seed, peer, items = _claim_board(seq=2)
    board.update_have("peer", 0, False, claims=0b0000_1111)  # the peer reads 0-3 from the seed, walking up
    # This client starts half-way along the gap 4-7 (the peer may soon claim 4), and announces its batch in flight
    # and what it reads next: the rest of its run, up to the tensor the peer claimed.
    assert [it.index for it in board.claim(seed, 0)] == [6]
    assert board.seed_claims() == 0b1100_0000
    board.complete(seed, [items[6]], [])
    assert [it.index for it in board.claim(seed, 0)] == [7]
    # The peer holds 0 now and still claims 1-3: this client reads 0 from the peer, and 1-3 from no one yet.
    board.update_have("peer", 0b0001, False, claims=0b1110)
    assert [it.index for it in board.claim(peer, 0)] == [0]
    assert board.claim(peer, 0) == []
    assert sorted(board.claim(seed, 0)[0].index for _ in range(2)) == [4, 5]
    assert board.claim(seed, 0) == [] and board.claim_overrides == 0


def test_board_starts_a_new_run_in_the_middle_of_the_longest_gap():
    # The peer holds 0-1 and reads 2-3 next: it walks towards 4, so this client starts half-way along 4-15.
    board, seed, peer, items = _claim_board(seq=2, n=16)
    board.update_have("peer", 0b0011, False, claims=0b1100)
    assert [it.index for it in board.claim(seed, 0)] == [10]
    assert [it.index for it in board.claim(seed, 0)] == [11]


def test_board_takes_a_claimed_tensor_from_the_seed_once_the_wait_expires():
    import time

    from sglang.srt.model_loader.peer_sources import CLAIM_WAIT_S

    board, seed, peer, items = _claim_board(seq=2)
    board.done = 0b1111_1000  # all but 0-2, which the peer claims
    board.update_have("peer", 0, False, claims=0b0111)
    assert board.claim(seed, 0) == []  # everything left is claimed: wait for the peer
    # The claim on 0 was first seen CLAIM_WAIT_S ago (and 1, 2 just now): only 0 may come from the seed.
    peer.set_claims(0b0110, time.monotonic())
    peer.set_claims(0b0111, time.monotonic() - CLAIM_WAIT_S)
    assert [it.index for it in board.claim(seed, 0)] == [0]
    assert board.claim_overrides == 1
    assert board.claim(seed, 0) == []


def test_board_forgets_the_claims_of_a_dropped_or_forked_peer():
    board, seed, peer, items = _claim_board(seq=2)
    board.done = 0b1111_0000
    board.update_have("peer", 0, False, claims=0b1111)
    assert board.claim(seed, 0) == []
    board.complete(peer, [], [], "the read failed")  # dropped: its claims mean nothing any more
    assert [it.index for it in board.claim(seed, 0)] == [0]
    # A peer that has forked holds everything: the seed is one source among the others, claims or not.
    board, seed, peer, items = _claim_board(seq=2, done=True)
    board.update_have("peer", 0xFF, True, claims=0b1111)
    assert [it.index for it in board.claim(seed, 0)] == [0]


def test_board_two_clients_claiming_one_tensor_the_earlier_joiner_keeps_it():
    # Both planned 1-3 before hearing of each other (claims travel with the registry exchange).
    for seq, expected in ((0, {1}), (2, {4, 5, 6, 7})):  # the later joiner goes elsewhere (where: its rate says)
        board, seed, peer, items = _claim_board(seq=seq, peer_seq=1)
        assert [it.index for it in board.claim(seed, 0)] == [0]
        assert board.seed_claims() == 0b1111
        board.update_have("peer", 0, False, claims=0b1110)
        board.complete(seed, [items[0]], [])
        assert board.claim(seed, 0)[0].index in expected


def test_lone_client_reads_everything_from_the_seed_in_its_order():
    import torch

    from sglang.srt.model_loader.peer_sources import BatchLimit, Item, Source, WorkBoard

    items = [Item(i, f"t{i}", torch.zeros(4), 16, 0, "x") for i in range(8)]
    board = WorkBoard(items, [5, 6, 7, 0, 1, 2, 3, 4], BatchLimit(32, 16))
    seed = Source("seed", "s", [0] * 8, is_seed=True)
    board.add(seed)
    got = []
    while batch := board.claim(seed, 0):
        got += [it.index for it in batch]
        board.complete(seed, batch, [])
    assert got == [5, 6, 7, 0, 1, 2, 3, 4] and board.finished and board.seed_claims() == 0


def test_longest_gap_wraps_around_and_is_split_by_bytes():
    from sglang.srt.model_loader.seed_runs import longest_gap, middle

    sizes = [10, 10, 10, 10, 10, 100, 10, 10]
    # Taken: 3 and 4. The free run 5, 6, 7, 0, 1, 2 wraps past the end; 5 alone is more than half its bytes.
    gap, gap_bytes = longest_gap(sizes, 0b0001_1000)
    assert gap == [5, 6, 7, 0, 1, 2] and gap_bytes == 150
    assert middle(gap, sizes, gap_bytes) == 5
    assert longest_gap(sizes, 0b0010_0001) == ([1, 2, 3, 4], 40)  # longer than 6, 7
    assert middle([1, 2, 3, 4], sizes, 40) == 3
    assert longest_gap(sizes, 0b1111_1111) == ([], 0)
    assert longest_gap(sizes, 0) == (list(range(8)), 170)


def test_board_leaves_an_earlier_joiner_that_has_not_started_the_run_it_will_pick():
    import time

    from sglang.srt.model_loader.peer_sources import CLAIM_WAIT_S, Source

    def first_pick(newcomer_seen: float) -> int:
        # Peer 0 holds 0-3 and reads 4-5; peer 1 joined before this client (join 2) but has read nothing yet: it
        # will start half-way along 6-15, at 11, so this client starts half-way along 6-10.
        board, seed, peer, items = _claim_board(seq=2, peer_seq=0, n=16)
        board.update_have("peer", 0b1111, False, claims=0b11_0000)
        board.add(Source("newcomer", "q", [0] * 16, is_seed=False, seq=1, seen=newcomer_seen))
        return board.claim(seed, 0)[0].index

    assert first_pick(time.monotonic()) == 8
    # One that has not started for CLAIM_WAIT_S is not waited for.
    assert first_pick(time.monotonic() - CLAIM_WAIT_S) == 11
