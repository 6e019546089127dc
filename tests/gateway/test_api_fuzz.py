"""Property-based tests of the REST API from its own OpenAPI schema: whatever
the path parameters, query strings and JSON bodies, no request gets a 500."""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.all import IP, TCP

from appliance.config import parse
from appliance.gateway import Gateway
from webui.app import create_app

TOKEN = "fuzz-admin-token"
CFG = {
    "api": {"token": TOKEN},
    "service": [{"name": "web", "vip": "203.0.113.10", "port": 80,
                 "backend": [{"name": "primary", "address": "198.51.100.10"},
                             {"name": "backup", "address": "198.51.100.20"}]}],
}

gw = Gateway(parse(CFG))
for port in (40000, 40001):
    gw.dataplane.handle(bytearray(bytes(IP(src="192.0.2.10", dst="203.0.113.10")
                                        / TCP(sport=port, dport=80, flags="S", seq=7))), 1.0)
client = TestClient(create_app(gw), raise_server_exceptions=False)
SCHEMA = client.get("/openapi.json").json()
OPERATIONS = sorted((path, method) for path, ops in SCHEMA["paths"].items() for method in ops)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref:
        name = ref.rsplit("/", 1)[1]
        return SCHEMA["components"]["schemas"][name]
    return schema


def value_for(schema: dict[str, Any]) -> st.SearchStrategy:
    """Values of the schema's type, its enum members, and things of the wrong type."""
    schema = _resolve(schema)
    options = [st.text(max_size=30), st.integers(-2**40, 2**40).map(str)]
    if "enum" in schema:
        options.append(st.sampled_from(schema["enum"]))
    for alt in schema.get("anyOf", []):
        alt = _resolve(alt)
        if "enum" in alt:
            options.append(st.sampled_from(alt["enum"]))
    options.append(st.sampled_from(["primary", "backup", "web", "1", "2", "-1", "true", "failover", "0.1"]))
    return st.one_of(options)


def body_for(schema: dict[str, Any]) -> st.SearchStrategy:
    schema = _resolve(schema)
    props = schema.get("properties", {})
    shaped = st.fixed_dictionaries({}, optional={k: st.one_of(json_values, value_for(v)) for k, v in props.items()})
    return st.one_of(shaped, json_values)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, dict[str, str], Any]:
    path, method = draw(st.sampled_from(OPERATIONS))
    op = SCHEMA["paths"][path][method]
    url = path
    query: dict[str, str] = {}
    for p in op.get("parameters", []):
        if p["in"] == "path":
            v = draw(st.one_of(st.integers(-5, 2**64).map(str), st.sampled_from(["1", "2", "primary", "web"]),
                               st.text(alphabet="abcxyz019_-.", min_size=1, max_size=12)))
            url = url.replace("{" + p["name"] + "}", v)
        elif p["in"] == "query" and draw(st.booleans()):
            query[p["name"]] = draw(value_for(p.get("schema", {})))
    if path.endswith("/stream"):
        query["timeout"] = "0.2"        # streams end on their own
    body = None
    if "requestBody" in op:
        content = op["requestBody"]["content"].get("application/json", {})
        body = draw(st.one_of(st.none(), body_for(content.get("schema", {}))))
    return method, url, query, body


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_no_generated_request_gets_a_500(req: tuple[str, str, dict[str, str], Any]) -> None:
    method, url, query, body = req
    kwargs: dict[str, Any] = {"params": query, "headers": {"Authorization": f"Bearer {TOKEN}"}}
    if body is not None:
        kwargs["content"] = json.dumps(body)
        kwargs["headers"]["Content-Type"] = "application/json"
    r = client.request(method.upper(), url, **kwargs)
    assert r.status_code < 500, (method, url, query, body, r.status_code, r.text[:500])
    if r.status_code == 422:
        assert r.json()["detail"], "a validation error names what is wrong"


def test_the_schema_documents_the_operator_api() -> None:
    paths = SCHEMA["paths"]
    assert "put" in paths["/api/v1/backends/{name}"] and "delete" in paths["/api/v1/connections/{cid}"]
    for p in ("/api/v1/events", "/api/v1/events/stream", "/api/v1/config", "/metrics", "/api/v1/audit",
              "/api/v1/tokens"):
        assert p in paths, p
    assert client.get("/docs").status_code == 200


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, prefix + (i,))
    return out


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_config_writes_of_mutated_documents_never_500(data: st.DataObject) -> None:
    """The current version with one value of the document replaced by anything:
    applied, or refused with 409/422 naming the field, never a 500."""
    h = {"Authorization": f"Bearer {TOKEN}"}
    cur = client.get("/api/v1/config", headers=h).json()
    doc = cur["config"]
    where = data.draw(st.sampled_from(_paths(doc)[1:]))
    target = doc
    for k in where[:-1]:
        target = target[k]
    target[where[-1]] = data.draw(json_values)
    # json.dumps writes Infinity/NaN, which the server's parser accepts: they must be refused cleanly too
    r = client.put("/api/v1/config", headers={**h, "Content-Type": "application/json"},
                   content=json.dumps({"version": cur["version"], "config": doc}))
    assert r.status_code in (200, 409, 422), (where, r.status_code, r.text[:300])
    if r.status_code == 422:
        assert r.json()["detail"][0].get("field") or r.json()["detail"][0].get("loc")
