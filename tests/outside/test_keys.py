"""API keys with budgets of their own, served end to end: the real CLI makes the keys, the real
openai client spends them over real sockets (tiny-random model), the ledger keeps the count."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import httpx
import openai
import pytest
from tinystack import TinyStack, access_lines

from exfilguard.ledger.apikeys import KeyStore
from exfilguard.ledger import open_ledger
from exfilguard.ledger.verify import verify_ledger
from exfilguard.protocol.wire import Kind, encode_frame


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exfilguard.cli.main", *args], capture_output=True, text=True, timeout=120)


def add_key(url: str, name: str, *opts: str) -> str:
    r = cli("keys", "add", name, "--ledger", url, *opts)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().rpartition(" ")[2]


def settled(store, key):
    """The key's budget once no reservation is outstanding (the answer's close runs after the reply)."""
    import time

    deadline = time.monotonic() + 30
    st = store.status(key)
    while st.outstanding_bytes and time.monotonic() < deadline:
        time.sleep(0.05)
        st = store.status(key)
    return st


def test_keys_cli(tmp_path):
    url = f"sqlite:///{tmp_path / 'keys.sqlite'}"
    secret = add_key(url, "alice", "--cap", "2KB", "--window", "1h=1KB")
    assert secret.startswith("sk-exfilguard-")
    add_key(url, "bob")
    rows = [json.loads(x) for x in cli("keys", "list", "--ledger", url, "--json").stdout.splitlines()]
    assert [(r["name"], r["state"], r["cap_bytes"], r["remaining_bytes"]) for r in rows] == [
        ("alice", "active", 2000, 1000), ("bob", "active", None, None)]
    assert "alice" in cli("keys", "list", "--ledger", url).stdout
    assert cli("keys", "revoke", "bob", "--ledger", url).returncode == 0
    assert json.loads(cli("keys", "list", "--ledger", url, "--json").stdout.splitlines()[1])["state"] == "revoked"
    # bad input: one clear line, the error tree's exit code, nothing changed
    for args, code in [(("keys", "add", "alice", "--ledger", url), 2), (("keys", "add", "bad name", "--ledger", url), 2),
                       (("keys", "add", "c", "--cap", "lots", "--ledger", url), 2),
                       (("keys", "revoke", "nobody", "--ledger", url), 2),
                       (("keys", "list", "--ledger", f"sqlite:///{tmp_path / 'none.sqlite'}"), 2)]:
        r = cli(*args)
        assert r.returncode == code, (args, r.stdout, r.stderr)
        assert r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert len(cli("keys", "list", "--ledger", url, "--json").stdout.splitlines()) == 2


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    d = tmp_path_factory.mktemp("keyed")
    url = f"sqlite:///{d / 'keys.sqlite'}"
    s = TinyStack(keys_ledger=url, meter_ledger=f"sqlite:///{d / 'meter.sqlite'}", cap=10**7)
    s.keys_url = url
    yield s
    s.close()


def test_key_bytes_are_what_crossed_the_meter_and_the_header_says_whats_left(keyed, caplog):
    caplog.set_level(logging.INFO, logger="exfilguard.access")
    secret = add_key(keyed.keys_url, "carol", "--cap", "100KB")
    store = KeyStore(open_ledger(keyed.keys_url))
    key = store.lookup(secret)
    c = keyed.client(secret)
    conn = keyed.outside.server.config.app.state.connection
    before = conn.bytes_in
    raw = c.completions.with_raw_response.create(model="tiny-random", prompt="Hello", max_tokens=12, seed=1, temperature=1.0)
    list(c.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "hi"}], max_tokens=9,
                                   seed=2, temperature=1.0, stream=True))
    n0 = len([r for r in caplog.records if r.name == "exfilguard.access"])
    lines = access_lines(caplog, 2)
    assert n0 >= 1
    assert [a["key"] for a in lines] == ["carol", "carol"]
    assert [a["status"] for a in lines] == [200, 200] and lines[1]["completion_tokens"] == 9
    got = sum(a["meter_bytes"] for a in lines)
    hello = len(encode_frame(Kind.HELLO, 0, conn.hello.to_bytes())) if before == 0 else 0
    # every byte the outside received for these answers is charged to the key: no less, no more
    assert got == conn.bytes_in - before - hello
    st = settled(store, key)
    assert st.used_bytes == got and st.outstanding_bytes == 0
    left = int(raw.headers["x-exfilguard-key-budget-remaining"])
    assert left == 100_000 - lines[0]["meter_bytes"]
    glob = int(raw.headers["x-exfilguard-global-budget-remaining"])
    assert 0 < glob <= 10**7
    assert int(raw.headers["x-exfilguard-budget-remaining"]) == min(left, glob)
    assert verify_ledger(store.ledger).ok


def test_spent_key_cap_is_429_that_says_do_not_retry(keyed):
    secret = add_key(keyed.keys_url, "dave", "--cap", "120")
    c = keyed.client(secret)
    answered = 0
    with pytest.raises(openai.RateLimitError) as e:
        for i in range(50):
            c.completions.create(model="tiny-random", prompt="Hello", max_tokens=8, seed=i, temperature=1.0)
            answered += 1
    assert answered >= 1
    assert e.value.body["type"] == "key_budget_exhausted" and "dave" in e.value.message
    assert e.value.response.headers["x-should-retry"] == "false"
    store = KeyStore(open_ledger(keyed.keys_url))
    st = settled(store, store.lookup(secret))
    assert st.used_bytes <= st.cap_bytes == 120
    assert st.outstanding_bytes == 0
    # another key is not affected
    other = add_key(keyed.keys_url, "erin")
    assert keyed.client(other).completions.create(model="tiny-random", prompt="x", max_tokens=2).usage.completion_tokens >= 1


def test_spent_window_is_429_with_retry_after(keyed):
    secret = add_key(keyed.keys_url, "fay", "--window", "10m=60")
    c = keyed.client(secret)
    with pytest.raises(openai.RateLimitError) as e:
        for i in range(50):
            c.completions.create(model="tiny-random", prompt="Hello", max_tokens=6, seed=i, temperature=1.0)
    ra = int(e.value.response.headers["retry-after"])
    assert 1 <= ra <= 600
    assert "retry in" in e.value.message


def test_key_that_cannot_pay_for_max_tokens_gets_fewer_tokens_cut_at_length(keyed, caplog):
    caplog.set_level(logging.INFO, logger="exfilguard.access")
    secret = add_key(keyed.keys_url, "gus", "--cap", "100")
    store = KeyStore(open_ledger(keyed.keys_url))
    key = store.lookup(secret)
    cost = keyed.outside.server.config.app.state.admission.cost
    # 200 tokens may cost 832 B; the key has 100: the answer gets the tokens 100 B pay for, and ends there
    r = httpx.post(keyed.base_url + "/completions", headers={"Authorization": f"Bearer {secret}"}, timeout=120,
                   json={"model": "tiny-random", "prompt": "Hello", "max_tokens": 200, "seed": 3, "temperature": 1.0,
                         "stream": True})
    assert r.status_code == 200
    events = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
    assert not any("error" in e for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(e["choices"][0]["text"] for e in events)
    (line,) = access_lines(caplog, 1)
    assert line["key"] == "gus" and line["budget_max_tokens"] == cost.tokens_within(100)
    assert 0 < line["completion_tokens"] <= cost.tokens_within(100) and text
    st = settled(store, key)
    assert st.used_bytes == line["meter_bytes"] <= 100  # every byte it received, none past its cap
    # whatever is left cannot pay for one token any more once spent: then 429 before anything runs
    for i in range(40):
        try:
            keyed.client(secret).completions.create(model="tiny-random", prompt="x", max_tokens=50, seed=i)
        except openai.RateLimitError as e:
            assert "bytes left for new answers" in e.message and "cap 100 B" in e.message
            break
    else:
        raise AssertionError("the key was never refused")
    assert settled(store, key).used_bytes <= 100
    assert verify_ledger(store.ledger).ok


def test_revoked_key_is_refused_at_once(keyed):
    secret = add_key(keyed.keys_url, "hal")
    c = keyed.client(secret)
    assert c.models.list().data[0].id == "tiny-random"
    assert cli("keys", "revoke", "hal", "--ledger", keyed.keys_url).returncode == 0
    with pytest.raises(openai.AuthenticationError) as e:
        c.models.list()
    assert "'hal' was revoked" in e.value.message  # told why, not "missing or unknown"
    with pytest.raises(openai.AuthenticationError) as e:
        keyed.client("sk-exfilguard-never-issued").models.list()
    assert "missing or unknown API key" in e.value.message


def test_up_reuses_its_api_key(tmp_path):
    from exfilguard.supervise import new_api_key

    a = new_api_key(tmp_path)
    b = new_api_key(tmp_path)
    assert a == b
    assert (tmp_path / "api-keys").read_text().splitlines() == [a]
    assert (tmp_path / "api-keys").stat().st_mode & 0o077 == 0


def test_client_hanging_up_mid_stream_still_settles_its_key(keyed, caplog):
    caplog.set_level(logging.INFO, logger="exfilguard.access")
    secret = add_key(keyed.keys_url, "ivy", "--cap", "1MB")
    store = KeyStore(open_ledger(keyed.keys_url))
    key = store.lookup(secret)
    with httpx.stream("POST", keyed.base_url + "/completions", headers={"Authorization": f"Bearer {secret}"}, timeout=60,
                      json={"model": "tiny-random", "prompt": "x", "max_tokens": 3000, "stream": True, "seed": 1}) as r:
        assert r.status_code == 200
        for _ in zip(range(4), r.iter_lines()):
            pass
    (line,) = access_lines(caplog, 1)
    assert line["status"] == 499 and line["key"] == "ivy"
    st = settled(store, key)
    assert st.outstanding_bytes == 0  # the reservation for 3000 tokens was settled, not left hanging
    assert 0 < st.used_bytes < 4 * 3000
    assert st.used_bytes >= line["meter_bytes"]  # late frames are charged too, never fewer
