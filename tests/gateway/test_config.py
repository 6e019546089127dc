"""Configuration errors name the field; good files load."""

from __future__ import annotations

import pytest

from appliance.config import ConfigError, load, parse

GOOD = {
    "api": {"token": "a-long-token"},
    "service": [{"name": "web", "vip": "203.0.113.10", "port": 80,
                 "backend": [{"name": "primary", "address": "198.51.100.10"},
                             {"name": "backup", "address": "198.51.100.20", "port": 8080}]}],
}


def variant(path: list, value) -> dict:
    import copy

    d = copy.deepcopy(GOOD)
    cur = d
    for p in path[:-1]:
        cur = cur[p]
    if value is KeyError:
        del cur[path[-1]]
    else:
        cur[path[-1]] = value
    return d


def test_good_config_loads_with_defaults() -> None:
    cfg = parse(GOOD)
    assert cfg.api.listen == "127.0.0.1:8080"
    assert cfg.gateway.on_malformed == "accept"
    web = cfg.service("web")
    assert web.backends[0].port == 80  # inherits the service port
    assert web.backend("backup").port == 8080


@pytest.mark.parametrize(
    "path,value,field",
    [
        (["service", 0, "vip"], "203.0.113.300", "service[0].vip"),
        (["service", 0, "backend", 1, "address"], "nowhere", "service[0].backend[1].address"),
        (["service", 0, "port"], 70000, "service[0].port"),
        (["service", 0, "port"], "80", "service[0].port"),
        (["service", 0, "backend"], [], "service[0].backend"),
        (["service", 0, "name"], "web page", "service[0].name"),
        (["service", 0, "colour"], "blue", "service[0].colour"),
        (["service", 0, "backend", 1, "name"], "primary", "service[0].backend[1].name"),
        (["service", 0, "backend", 1, "address"], "203.0.113.10", "service[0].backend[1].address"),
        (["api", "token"], "short", "api.token"),
        (["api", "token"], KeyError, "api.token"),
        (["api", "listen"], "localhost", "api.listen"),
        (["gateway"], {"on_malformed": "explode"}, "gateway.on_malformed"),
        (["gateway"], {"max_connections": 0}, "gateway.max_connections"),
        (["gateway"], {"timeouts": {"idle": 3}}, "gateway.timeouts.idle"),
        (["gateway"], {"timeouts": {"established": -1}}, "gateway.timeouts.established"),
        (["service"], [], "service"),
        (["gateway"], {"on_failure": "maybe"}, "gateway.on_failure"),
        (["gateway"], {"on_failure": "open", "fail_open": True}, "gateway.fail_open"),
        (["store"], {"mode": "peer"}, "pair.node"),  # a pair node needs its [pair] section
        (["store"], {"mode": "tape"}, "store.mode"),
        (["store"], {"commit_interval": 5}, "store.commit_interval"),
        (["store"], {"max_total_bytes": 10}, "store.max_total_bytes"),
        (["store"], {"fsync": False}, "store.fsync"),
        (["checkpoint"], {"key": "short"}, "checkpoint.key"),
        (["checkpoint"], {"key": "k" * 20, "key_file": "x"}, "checkpoint.key"),
        (["checkpoint"], {"key_file": "/nonexistent/key"}, "checkpoint.key_file"),
        (["checkpoint"], {"msl": 0}, "checkpoint.msl"),
    ],
)
def test_errors_name_the_field(path: list, value, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(variant(path, value))
    assert e.value.field == field
    assert str(e.value).startswith(field + ":")


def test_token_file_and_toml_errors(tmp_path) -> None:
    (tmp_path / "tok").write_text("from-a-file-123\n")
    cfg = tmp_path / "gw.toml"
    cfg.write_text('[api]\ntoken_file = "tok"\n[[service]]\nname = "w"\nvip = "203.0.113.1"\n'
                   '[[service.backend]]\nname = "p"\naddress = "198.51.100.1"\n')
    assert load(cfg).api.token == "from-a-file-123"
    cfg.write_text("[api\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(cfg)
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.toml")


# --- health, failover and admin state ----------------------------------------------

def test_health_failover_and_admin_state_defaults() -> None:
    from appliance.config import BackendConfig, FailoverConfig, ServiceConfig
    from appliance.health import HealthConfig

    web = parse(GOOD).service("web")
    assert web.health == HealthConfig()
    assert (web.health.check, web.health.interval, web.health.timeout, web.health.rise, web.health.fall,
            web.health.path, web.health.expect) == ("tcp", 0.1, None, 2, 3, "/", (200, 399))
    assert web.health.probe_timeout == 0.1                     # no timeout: the interval
    assert web.failover == FailoverConfig()
    assert (web.failover.auto, web.failover.mode, web.failover.max_log_bytes, web.failover.verify,
            web.failover.syn_retries, web.failover.move_timeout) == (True, "replay", 16 << 20, "full", 6, 10.0)
    assert [b.admin_state for b in web.backends] == ["ready", "ready"]
    # code that builds these by hand keeps working
    b = BackendConfig(name="p", address="198.51.100.1", port=80)
    s = ServiceConfig(name="s", vip="203.0.113.1", port=80, backends=(b,))
    assert b.admin_state == "ready" and s.health == HealthConfig() and s.failover == FailoverConfig()


def test_health_failover_and_admin_state_are_parsed() -> None:
    d = variant(["service", 0, "health"], {"check": "http", "interval": 0.5, "timeout": 2, "rise": 1,
                                           "fall": 5, "path": "/healthz", "expect": [200, 204]})
    d["service"][0]["failover"] = {"auto": False, "max_log_bytes": 1024, "verify": "full",
                                   "syn_retries": 20, "move_timeout": 0.1}
    d["service"][0]["backend"][1]["admin_state"] = "drain"
    web = parse(d).service("web")
    assert (web.health.check, web.health.interval, web.health.timeout, web.health.rise, web.health.fall,
            web.health.path, web.health.expect) == ("http", 0.5, 2.0, 1, 5, "/healthz", (200, 204))
    assert web.health.probe_timeout == 2.0
    assert (web.failover.auto, web.failover.mode, web.failover.max_log_bytes, web.failover.verify,
            web.failover.syn_retries, web.failover.move_timeout) == (False, "replay", 1024, "full", 20, 0.1)
    assert web.backend("backup").admin_state == "drain"
    assert web.backend("primary").admin_state == "ready"


def test_docstring_example_parses() -> None:
    import textwrap
    import tomllib

    import appliance.config

    example = textwrap.dedent(appliance.config.__doc__.split("Example::", 1)[1])
    cfg = parse(tomllib.loads(example))
    web = cfg.service("web")
    assert web.health.check == "tcp" and web.failover.mode == "replay"
    assert web.backend("backup").admin_state == "ready"


@pytest.mark.parametrize(
    "path,value,field",
    [
        (["service", 0, "health"], {"check": "icmp"}, "service[0].health.check"),
        (["service", 0, "health"], {"interval": 0.001}, "service[0].health.interval"),
        (["service", 0, "health"], {"interval": "fast"}, "service[0].health.interval"),
        (["service", 0, "health"], {"timeout": 0}, "service[0].health.timeout"),
        (["service", 0, "health"], {"timeout": -1.5}, "service[0].health.timeout"),
        (["service", 0, "health"], {"rise": 0}, "service[0].health.rise"),
        (["service", 0, "health"], {"fall": 101}, "service[0].health.fall"),
        (["service", 0, "health"], {"fall": 2.5}, "service[0].health.fall"),
        (["service", 0, "health"], {"path": "health"}, "service[0].health.path"),
        (["service", 0, "health"], {"path": "/a b"}, "service[0].health.path"),
        (["service", 0, "health"], {"expect": [200]}, "service[0].health.expect"),
        (["service", 0, "health"], {"expect": [99, 200]}, "service[0].health.expect"),
        (["service", 0, "health"], {"expect": [300, 200]}, "service[0].health.expect"),
        (["service", 0, "health"], {"expect": [200, 600]}, "service[0].health.expect"),
        (["service", 0, "health"], {"expect": "200-399"}, "service[0].health.expect"),
        (["service", 0, "health"], {"retries": 3}, "service[0].health.retries"),
        (["service", 0, "health"], "tcp", "service[0].health"),
        (["service", 0, "failover"], {"auto": "yes"}, "service[0].failover.auto"),
        (["service", 0, "failover"], {"mode": "repair"}, "service[0].failover.mode"),
        (["service", 0, "failover"], {"max_log_bytes": 1023}, "service[0].failover.max_log_bytes"),
        (["service", 0, "failover"], {"max_log_bytes": (1 << 31) + 1}, "service[0].failover.max_log_bytes"),
        (["service", 0, "failover"], {"verify": "none"}, "service[0].failover.verify"),
        (["service", 0, "failover"], {"syn_retries": 0}, "service[0].failover.syn_retries"),
        (["service", 0, "failover"], {"syn_retries": 21}, "service[0].failover.syn_retries"),
        (["service", 0, "failover"], {"move_timeout": 0.05}, "service[0].failover.move_timeout"),
        (["service", 0, "failover"], {"fast": True}, "service[0].failover.fast"),
        (["service", 0, "backend", 1, "admin_state"], "maintenance", "service[0].backend[1].admin_state"),
        (["service", 0, "backend", 0, "admin_state"], "", "service[0].backend[0].admin_state"),
    ],
)
def test_new_settings_errors_name_the_field(path: list, value, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(variant(path, value))
    assert e.value.field == field
    assert str(e.value).startswith(field + ":")


def test_failover_mode_error_names_the_modes() -> None:
    with pytest.raises(ConfigError, match="must be one of replay, resume"):
        parse(variant(["service", 0, "failover"], {"mode": "repair"}))
    for state in ("ready", "drain", "maint"):
        assert parse(variant(["service", 0, "backend", 1, "admin_state"], state)).services[0].backends[1].admin_state == state


def test_store_and_checkpoint_settings(tmp_path) -> None:
    (tmp_path / "cp.key").write_text("a-key-from-a-file-0123456789\n")
    cfg = tmp_path / "gw.toml"
    cfg.write_text('[gateway]\non_failure = "closed"\n[api]\ntoken = "a-long-token"\n'
                   '[store]\nmode = "disk"\npath = "cp.db"\ncommit_interval = 0.002\n'
                   '[checkpoint]\nkey_file = "cp.key"\nmsl = 60\n'
                   '[[service]]\nname = "w"\nvip = "203.0.113.1"\n'
                   '[[service.backend]]\nname = "p"\naddress = "198.51.100.1"\n')
    c = load(cfg)
    assert c.gateway.on_failure == "closed" and not c.gateway.fail_open
    assert c.store.mode == "disk" and c.store.path == str(tmp_path / "cp.db") and c.store.commit_interval == 0.002
    assert c.checkpoint.key == b"a-key-from-a-file-0123456789" and c.checkpoint.msl == 60.0
    # the older spelling still works
    old = parse({"gateway": {"fail_open": False}, "api": {"token": "a-long-token"},
                 "service": [{"name": "w", "vip": "203.0.113.1", "backend": [{"name": "p", "address": "198.51.100.1"}]}]})
    assert old.gateway.on_failure == "closed" and old.store.mode == "memory" and old.checkpoint.key == b""


# --- the gateway pair (issue 13): store.mode = "peer" and [pair] -----------------------------

PAIR: dict[str, object] = {"node": 2, "redis": "192.0.2.254:6390", "peer_redis": "192.0.2.253:6390",
                           "vrrp_fifo": "vrrp.fifo", "eligibility_file": "run/ineligible",
                           "epoch_file": "/var/lib/appliance/epoch"}


def pair_variant(**pair: object) -> dict:
    import copy

    d: dict = copy.deepcopy(GOOD)
    d["store"] = {"mode": "peer"}
    d["gateway"] = {"on_failure": "closed"}
    d["pair"] = {**PAIR, **pair}
    return d


def test_a_pair_node_refuses_the_queues_bypass() -> None:
    """With the appliance down the bypass would forward bytes no gateway logs, and the backend's
    ACKs would tell the client they are safe: a pair node holds them instead."""
    for gw in ({}, {"on_failure": "open"}, {"fail_open": True}):
        d = pair_variant()
        d["gateway"] = gw
        with pytest.raises(ConfigError) as e:
            parse(d)
        assert e.value.field == "gateway.on_failure" and '"closed"' in str(e.value)


def test_pair_disk_is_off_unless_asked() -> None:
    assert parse(pair_variant()).pair.disk is False
    assert parse(pair_variant(disk=True)).pair.disk is True
    with pytest.raises(ConfigError) as e:
        parse(pair_variant(disk="yes"))
    assert e.value.field == "pair.disk"


def test_pair_section_loads_with_paths_relative_to_the_config_file(tmp_path) -> None:
    cfg = tmp_path / "etc" / "gw.toml"
    cfg.parent.mkdir()
    cfg.write_text('[api]\ntoken = "a-long-token"\n[gateway]\non_failure = "closed"\n[store]\nmode = "peer"\n'
                   '[pair]\nnode = 2\nredis = "[2001:db8::2]:6390"\npeer_redis = "[2001:db8::1]:6390"\n'
                   'vrrp_fifo = "vrrp.fifo"\neligibility_file = "run/ineligible"\n'
                   'epoch_file = "/var/lib/appliance/epoch"\nlease = 2.5\nsync_lease = 4\nwait_ms = 300\n'
                   '[[service]]\nname = "w"\nvip = "203.0.113.1"\n'
                   '[[service.backend]]\nname = "p"\naddress = "198.51.100.1"\n')
    c = load(cfg)
    p = c.pair
    assert p is not None and c.store.mode == "peer" and c.store.gated
    assert p.node == 2 and p.redis == "[2001:db8::2]:6390" and p.peer_redis == "[2001:db8::1]:6390"
    assert p.vrrp_fifo == str(tmp_path / "etc" / "vrrp.fifo")
    assert p.eligibility_file == str(tmp_path / "etc" / "run" / "ineligible")
    assert p.epoch_file == "/var/lib/appliance/epoch"          # absolute stays as written
    assert p.lease == 2.5 and p.sync_lease == 4.0 and p.wait_ms == 300


def test_pair_defaults_and_no_pair_without_peer_mode() -> None:
    p = parse(pair_variant()).pair
    assert p is not None and p.lease == 0.4 and p.sync_lease == 2.0 and p.wait_ms == 200 and p.node == 2
    assert p.redis == "192.0.2.254:6390"
    assert parse(GOOD).pair is None and not parse(GOOD).store.gated
    assert parse(variant(["store"], {"mode": "disk"})).pair is None


@pytest.mark.parametrize("key", ["node", "redis", "peer_redis", "vrrp_fifo", "eligibility_file", "epoch_file"])
def test_each_required_pair_setting_names_its_field(key: str) -> None:
    d = pair_variant()
    del d["pair"][key]
    with pytest.raises(ConfigError) as e:
        parse(d)
    assert e.value.field == f"pair.{key}", str(e.value)
    assert "required" in str(e.value)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"redis": "2001:db8::2:6390"}, "pair.redis"),              # IPv6 without brackets
        ({"peer_redis": "2001:db8::1:6390"}, "pair.peer_redis"),
        ({"redis": "192.0.2.254"}, "pair.redis"),                   # no port
        ({"peer_redis": "[2001:db8::1]"}, "pair.peer_redis"),
        ({"redis": "192.0.2.254:"}, "pair.redis"),
        ({"redis": "192.0.2.254:0"}, "pair.redis"),
        ({"redis": "192.0.2.254:65536"}, "pair.redis"),
        ({"redis": "192.0.2.254:http"}, "pair.redis"),
        ({"redis": "gw2.example:6390"}, "pair.redis"),              # a name, not an address
        ({"redis": "192.0.2.300:6390"}, "pair.redis"),
        ({"redis": 6390}, "pair.redis"),
        ({"redis": ""}, "pair.redis"),
        ({"peer_redis": "192.0.2.254:6390"}, "pair.peer_redis"),    # the same as this node's
        ({"node": 3}, "pair.node"),
        ({"node": 0}, "pair.node"),
        ({"node": "1"}, "pair.node"),
        ({"node": True}, "pair.node"),
        ({"vrrp_fifo": ""}, "pair.vrrp_fifo"),
        ({"epoch_file": 1}, "pair.epoch_file"),
        ({"lease": 0.1}, "pair.lease"),
        ({"lease": 31}, "pair.lease"),
        ({"lease": "1s"}, "pair.lease"),
        ({"sync_lease": 0.1}, "pair.sync_lease"),
        ({"sync_lease": 31}, "pair.sync_lease"),
        ({"sync_lease": "1s"}, "pair.sync_lease"),
        ({"wait_ms": 0}, "pair.wait_ms"),
        ({"wait_ms": 1000}, "pair.wait_ms"),                        # = lease * 1000 (lease 1 s)
        ({"wait_ms": 1001}, "pair.wait_ms"),
        ({"lease": 0.5, "wait_ms": 500}, "pair.wait_ms"),
        ({"lease": 0.5, "wait_ms": 600}, "pair.wait_ms"),
        ({"wait_ms": 2.5}, "pair.wait_ms"),
        ({"fence": True}, "pair.fence"),                            # unknown setting
    ],
)
def test_pair_errors_name_the_field(change: dict, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(pair_variant(**change))
    assert e.value.field == field, str(e.value)
    assert str(e.value).startswith(field + ":")


def test_pair_wait_ms_just_below_the_lease_is_accepted() -> None:
    p = parse(pair_variant(lease=0.5, wait_ms=499)).pair
    assert p is not None and p.wait_ms == 499 and p.lease == 0.5
    p = parse(pair_variant(lease=30, wait_ms=10_000)).pair
    assert p is not None and p.wait_ms == 10_000


@pytest.mark.parametrize("peer", ["192.0.2.254:06390", "[2001:DB8::2]:6390"])
def test_pair_peer_spelled_differently_is_still_this_nodes_own(peer: str) -> None:
    me = "[2001:db8::2]:6390" if peer.startswith("[") else "192.0.2.254:6390"
    with pytest.raises(ConfigError) as e:
        parse(pair_variant(redis=me, peer_redis=peer))
    assert e.value.field == "pair.peer_redis"


def test_the_ipv6_bracket_error_says_how_to_write_it() -> None:
    with pytest.raises(ConfigError, match=r"\[ADDRESS\]:PORT"):
        parse(pair_variant(redis="2001:db8::2:6390"))


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_pair_section_without_peer_mode_is_refused(mode: str) -> None:
    d = pair_variant()
    d["store"] = {"mode": mode}
    with pytest.raises(ConfigError) as e:
        parse(d)
    assert e.value.field == "pair" and "peer" in str(e.value)
    d.pop("store")                                              # the default mode (memory) too
    with pytest.raises(ConfigError) as e:
        parse(d)
    assert e.value.field == "pair"


def test_pair_must_be_a_table() -> None:
    d = pair_variant()
    d["pair"] = "192.0.2.253:6390"
    with pytest.raises(ConfigError) as e:
        parse(d)
    assert e.value.field == "pair"


# --- resume mode (issue 5, phase 2) -------------------------------------------------------

def resume_variant(**agent: object) -> dict:
    import copy

    d = copy.deepcopy(GOOD)
    d["service"][0]["failover"] = {"mode": "resume"}
    d["service"][0]["backend"][0]["agent"] = "198.51.100.10:7070"
    d["service"][0]["backend"][1]["agent"] = "198.51.100.20:7070"
    d["agent"] = {"key": "an-agent-key-0123456789", **agent}
    return d


def test_resume_mode_with_agents_and_key_loads(tmp_path) -> None:
    cfg = parse(resume_variant(timeout=2.5, heartbeat=0.2))
    web = cfg.service("web")
    assert web.failover.mode == "resume"
    assert [b.agent for b in web.backends] == ["198.51.100.10:7070", "198.51.100.20:7070"]
    assert cfg.agent.key == b"an-agent-key-0123456789" and cfg.agent.timeout == 2.5 and cfg.agent.heartbeat == 0.2
    # the key from a file, as [checkpoint] key_file
    (tmp_path / "agent.key").write_text("agent-key-from-a-file-0123\n")
    d = resume_variant()
    d["agent"] = {"key_file": "agent.key"}
    assert parse(d, tmp_path).agent.key == b"agent-key-from-a-file-0123"
    # replay services need no agent and no key
    assert parse(GOOD).agent.key == b""


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda d: d["service"][0]["backend"][1].pop("agent"), "service[0].backend[1].agent"),
        (lambda d: d["service"][0]["backend"][0].update(agent="198.51.100.10"), "service[0].backend[0].agent"),
        (lambda d: d["service"][0]["backend"][0].update(agent="agent.example:7070"), "service[0].backend[0].agent"),
        (lambda d: d["service"][0]["backend"][0].update(agent="198.51.100.10:70000"), "service[0].backend[0].agent"),
        (lambda d: d["service"][0]["backend"][0].update(agent=7070), "service[0].backend[0].agent"),
        (lambda d: d.pop("agent"), "agent.key"),
        (lambda d: d["agent"].update(key="short"), "agent.key"),
        (lambda d: d["agent"].update(key_file="nope.key"), "agent.key"),
        (lambda d: d["agent"].pop("key") and d["agent"].update(key_file="/nonexistent/agent.key"), "agent.key_file"),
        (lambda d: d["agent"].update(timeout=0), "agent.timeout"),
        (lambda d: d["agent"].update(heartbeat="fast"), "agent.heartbeat"),
        (lambda d: d["agent"].update(port=7070), "agent.port"),
    ],
)
def test_resume_mode_errors_name_the_field(change, field: str) -> None:
    d = resume_variant()
    change(d)
    with pytest.raises(ConfigError) as e:
        parse(d)
    assert e.value.field == field, str(e.value)


# --- test-only settings ([testing], APPLIANCE_TESTING=1) ------------------------------------

def test_testing_table_is_refused_without_the_environment(monkeypatch) -> None:
    monkeypatch.delenv("APPLIANCE_TESTING", raising=False)
    with pytest.raises(ConfigError) as e:
        parse(variant(["testing"], {"store_commit_delay": 0.05}))
    assert e.value.field == "testing"
    assert "APPLIANCE_TESTING=1" in str(e.value)
    monkeypatch.setenv("APPLIANCE_TESTING", "yes")  # only "1" enables it
    with pytest.raises(ConfigError, match="APPLIANCE_TESTING=1"):
        parse(variant(["testing"], {"store_commit_delay": 0.05}))


def test_testing_table_is_accepted_with_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("APPLIANCE_TESTING", "1")
    cfg = parse(variant(["testing"], {"store_commit_delay": 0.05}))
    assert cfg.store.test_commit_delay == 0.05  # where the daemon reads it
    with pytest.raises(ConfigError) as e:
        parse(variant(["testing"], {"store_commit_delay": -1}))
    assert e.value.field == "testing.store_commit_delay"
    with pytest.raises(ConfigError) as e:
        parse(variant(["testing"], {"commit_delay": 0.05}))
    assert e.value.field == "testing.commit_delay"


def test_a_benchmark_may_choose_the_digests_search(monkeypatch) -> None:
    monkeypatch.setenv("APPLIANCE_TESTING", "1")
    assert parse(variant(["testing"], {"memsearch": "memmem"})).gateway.test_memsearch == "memmem"
    assert parse(variant(["testing"], {"store_commit_delay": 0.01})).gateway.test_memsearch is None
    with pytest.raises(ConfigError) as e:
        parse(variant(["testing"], {"memsearch": "grep"}))
    assert e.value.field == "testing.memsearch" and "memfind" in str(e.value)


def test_store_no_longer_takes_the_test_setting(monkeypatch) -> None:
    for env in ("0", "1"):
        monkeypatch.setenv("APPLIANCE_TESTING", env)
        with pytest.raises(ConfigError) as e:
            parse(variant(["store"], {"mode": "disk", "test_commit_delay": 0.05}))
        assert e.value.field == "store.test_commit_delay" and "[testing]" in str(e.value)
    monkeypatch.delenv("APPLIANCE_TESTING")
    assert parse(GOOD).store.test_commit_delay == 0.0


def test_the_lab_enables_testing_only_for_a_config_with_test_settings(tmp_path, monkeypatch) -> None:
    from appliance.lab import topology as lab

    monkeypatch.setenv("APPLIANCE_LAB_DIR", str(tmp_path))
    monkeypatch.setenv("APPLIANCE_TESTING", "1")  # the runner's own environment is not passed on
    token = tmp_path / "token"
    token.write_text("a-long-token\n")
    (tmp_path / "gateway.toml").write_text(lab.gateway_config(lab.topology(), token))
    plain = lab.variant_config("disk", store={"mode": "disk"})
    slow = lab.variant_config("slow", store={"mode": "disk"}, testing={"store_commit_delay": 0.05})
    assert "APPLIANCE_TESTING" not in lab.appliance_env(tmp_path / "gateway.toml")
    assert "APPLIANCE_TESTING" not in lab.appliance_env(plain)
    assert lab.appliance_env(slow)["APPLIANCE_TESTING"] == "1"
    assert load(slow).store.test_commit_delay == 0.05  # the daemon's attribute
    monkeypatch.delenv("APPLIANCE_TESTING")
    with pytest.raises(ConfigError, match="^testing: test-only settings need APPLIANCE_TESTING=1"):
        load(slow)
    assert load(plain).store.test_commit_delay == 0.0


def test_the_fast_path_is_on_by_default_and_can_be_turned_off() -> None:
    assert parse(GOOD).gateway.fastpath is True
    assert parse(variant(["gateway"], {"fastpath": False})).gateway.fastpath is False
    with pytest.raises(ConfigError) as e:
        parse(variant(["gateway"], {"fastpath": "yes"}))
    assert e.value.field == "gateway.fastpath"
