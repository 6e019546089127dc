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
