"""Contract: what the client really sends agrees with Klaviyo's official generated SDK.

The oracle is ``openapi_client`` from the ``klaviyo-api`` wheel (generated from Klaviyo's OpenAPI
document): its pydantic request models and, in ``openapi_client/api/*.py``, the method, path and
query parameters of every operation.
"""

from __future__ import annotations

import ast
import functools
import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from segops_sync.klaviyo import REVISION, Endpoint, JobStatus, ProfileInput
from segops_sync.klaviyo_sim import Simulator, validate_body

from .conftest import Env, Sent

openapi_client = pytest.importorskip("openapi_client")


@dataclass(frozen=True)
class Operation:
    name: str
    method: str
    path: str  # template, e.g. /api/lists/{id}/relationships/profiles
    query: frozenset[str]
    body_model: str | None  # class name of the request body model

    def matches(self, method: str, path: str) -> bool:
        pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(self.path)) + "$"
        return method == self.method and re.match(pattern, path) is not None


@functools.cache
def generated_operations() -> tuple[Operation, ...]:
    """Every operation of the generated API classes, read from their source with ``ast``."""
    api_dir = Path(openapi_client.__file__).parent / "api"
    ops: list[Operation] = []
    for source in sorted(api_dir.glob("*_api.py")):
        tree = ast.parse(source.read_text())
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            funcs = {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}
            for name, func in funcs.items():
                if not (name.startswith("_") and name.endswith("_serialize")):
                    continue
                public = funcs.get(name[1 : -len("_serialize")])
                ops.append(_operation(name[1 : -len("_serialize")], func, public))
    return tuple(ops)


def _operation(name: str, serialize: ast.FunctionDef, public: ast.FunctionDef | None) -> Operation:
    method = path = None
    query: set[str] = set()
    for node in ast.walk(serialize):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        if node.func.attr == "append" and getattr(node.func.value, "id", "") == "_query_params":
            arg = node.args[0]
            if isinstance(arg, ast.Tuple) and isinstance(arg.elts[0], ast.Constant):
                query.add(str(arg.elts[0].value))
        if node.func.attr == "param_serialize":
            for kw in node.keywords:
                if kw.arg == "method" and isinstance(kw.value, ast.Constant):
                    method = str(kw.value.value)
                if kw.arg == "resource_path" and isinstance(kw.value, ast.Constant):
                    path = str(kw.value.value)
    body_model = None
    if public is not None:
        for param in public.args.args[1:]:
            ann = param.annotation
            if isinstance(ann, ast.Name) and ann.id.endswith("Query"):
                body_model = ann.id
    assert method and path, f"could not read {name}"
    return Operation(name, method, path, frozenset(query), body_model)


def operation_for(method: str, path: str) -> Operation:
    found = [op for op in generated_operations() if op.matches(method, path)]
    # a literal segment beats a parameter (e.g. /api/profiles vs /api/profiles/{id})
    found.sort(key=lambda op: op.path.count("{"))
    assert found, f"{method} {path} is not an operation of Klaviyo's generated SDK"
    return found[0]


def model_class(name: str) -> Any:
    module = importlib.import_module("openapi_client.models")
    return getattr(module, name)


def exercise_every_operation(env: Env) -> list[Sent]:
    """Calls every client method against the simulator, recording the wire traffic."""
    client, recorder = env.recording_client()
    client.get_account_id()
    client.get_list(env.list_id)
    client.get_list(env.list_id, profile_count=True)
    client.create_list("Picked")
    list(client.iter_lists())
    profile_id = client.upsert_profile(ProfileInput(email="solo@example.com", external_id="u-0"))
    client.upsert_profile(ProfileInput(external_id="only-external"))
    client.upsert_profile(ProfileInput(external_id="u-t", fields=TRAIT_FIELDS, properties=PROPS))
    profiles = [ProfileInput(email=f"p{i}@example.com") for i in range(3)]
    profiles += [
        ProfileInput(external_id="ext-1"),
        ProfileInput(email="b@example.com", external_id="ext-2"),
        # traits: every standard field and custom properties of several JSON types
        ProfileInput(email="t@example.com", fields=TRAIT_FIELDS, properties=PROPS),
    ]
    profiles.append(ProfileInput(external_id="x" * 300))  # an import error to page through
    job_id = client.create_bulk_import_job(profiles, env.list_id).id
    client.get_bulk_import_job(job_id)
    list(client.iter_bulk_import_jobs([JobStatus.QUEUED, JobStatus.PROCESSING]))
    list(client.iter_bulk_import_jobs([JobStatus.QUEUED, JobStatus.COMPLETE], newest_first=True))
    list(client.iter_bulk_import_errors(job_id))
    list(client.iter_bulk_import_profiles(job_id))
    client.add_profiles_to_list(env.list_id, [profile_id])
    client.remove_profiles_from_list(env.list_id, [profile_id])
    client.find_profile_ids("email", ["p0@example.com", 'we"ird\\@example.com'])
    client.find_profile_ids("external_id", ["ext-1", "u-0"])
    list(client.iter_list_profile_ids(env.list_id))
    list(client.iter_list_members(env.list_id))
    client.find_list_profile_ids(env.list_id, ["p0@example.com", 'we"ird\\@example.com'])
    # last: the profiles are gone once Klaviyo has run the deletions
    client.request_profile_deletion(profile_id=profile_id)
    client.request_profile_deletion(email="p1@example.com")
    return recorder.sent


TRAIT_FIELDS = {
    "first_name": "Ann",
    "last_name": "Lee",
    "phone_number": "+14155552671",
    "organization": "Shop",
    "title": "Buyer",
    "locale": "en-US",
}
PROPS: dict[str, Any] = {"plan": "pro", "seats": 3, "beta": True, "tags": ["a", "b"]}


@pytest.fixture
def traffic(env: Env) -> list[Sent]:
    sent = exercise_every_operation(env)
    assert sent, "nothing was recorded"
    return sent


def test_every_method_and_path_exists_in_the_generated_api(traffic: list[Sent]) -> None:
    called = {(s.method, s.path) for s in traffic}
    for method, path in called:
        operation_for(method, path)
    # and each Endpoint member is one of Klaviyo's operations, with the same method
    for endpoint in Endpoint:
        op = operation_for(endpoint.method, endpoint.path_template.replace("{id}", "X1"))
        assert op.method == endpoint.method
    used = {operation_for(m, p).name for m, p in called}
    assert len(used) == len(Endpoint), f"not every endpoint was exercised: {sorted(used)}"


def test_query_parameters_are_ones_the_operation_accepts(traffic: list[Sent]) -> None:
    for sent in traffic:
        op = operation_for(sent.method, sent.path)
        unknown = {name for name, _ in sent.params} - op.query
        assert not unknown, f"{op.name} does not take {unknown}"


def test_every_body_round_trips_through_the_official_model(traffic: list[Sent]) -> None:
    bodies = [s for s in traffic if s.body]
    assert {operation_for(s.method, s.path).name for s in bodies} == {
        "bulk_import_profiles",
        "create_or_update_profile",
        "add_profiles_to_list",
        "remove_profiles_from_list",
        "create_list",
        "request_profile_deletion",
    }
    for sent in bodies:
        op = operation_for(sent.method, sent.path)
        assert op.body_model, f"{op.name} takes no body in the SDK"
        model = model_class(op.body_model)
        body = sent.json()
        # equality after the round trip: no unknown member was silently dropped by the model
        validated = model.model_validate(body)
        dumped = validated.model_dump(by_alias=True, exclude_unset=True, mode="json")
        assert dumped == body, f"{op.body_model} does not round-trip"
        # the SDK's own from_dict/to_dict fills every nullable field with None; minus those
        via_sdk = json.loads(json.dumps(_without_none(model.from_dict(body).to_dict())))
        assert via_sdk == body, f"{op.body_model}.from_dict/to_dict does not round-trip"
        assert "null" not in sent.body.decode(), "absent attributes must be omitted, not null"


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


def test_bulk_job_body_has_the_list_in_relationships(traffic: list[Sent]) -> None:
    [job] = [s for s in traffic if s.method == "POST" and s.path == "/api/profile-bulk-import-jobs"]
    data = job.json()["data"]
    assert data["type"] == "profile-bulk-import-job"
    assert data["relationships"] == {"lists": {"data": [{"type": "list", "id": job_list(job)}]}}
    first = data["attributes"]["profiles"]["data"][0]
    assert first == {"type": "profile", "attributes": {"email": "p0@example.com"}}
    assert {"type": "profile", "attributes": {"external_id": "ext-1"}} in (
        data["attributes"]["profiles"]["data"]
    )


def job_list(sent: Sent) -> str:
    lists = sent.json()["data"]["relationships"]["lists"]["data"]
    assert len(lists) == 1
    return str(lists[0]["id"])


def test_headers_on_every_request(traffic: list[Sent], env: Env) -> None:
    for sent in traffic:
        assert sent.headers["authorization"] == f"Klaviyo-API-Key {env.key}"
        assert sent.headers["revision"] == REVISION
        assert sent.headers["accept"] == "application/vnd.api+json"
        if sent.body:
            assert sent.headers["content-type"] == "application/vnd.api+json"
        else:
            assert "content-type" not in sent.headers


def test_revision_is_the_vendored_spec_revision() -> None:
    # The SDK wheel may pin a newer revision; ours must be the one the bodies were checked against.
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", REVISION)
    assert REVISION == "2026-07-15"


def test_job_states_are_exactly_the_official_models() -> None:
    attributes = model_class("ProfileImportJobResponseObjectResourceAttributes")
    for status in JobStatus:
        assert attributes.status_validate_enum(status.value) == status
    with pytest.raises(ValueError) as refused:
        attributes.status_validate_enum("not-a-state")
    assert set(re.findall(r"'([a-z_]+)'", str(refused.value))) == set(JobStatus)


def test_lookups_use_quoted_escaped_any_filters(traffic: list[Sent]) -> None:
    filters = [dict(s.params)["filter"] for s in traffic if s.path == "/api/profiles"]
    assert 'any(email,["p0@example.com","we\\"ird\\\\@example.com"])' in filters
    assert 'any(external_id,["ext-1","u-0"])' in filters
    for sent in traffic:
        if sent.path == "/api/profiles":
            params = dict(sent.params)
            assert params["page[size]"] == "100"
            assert params["fields[profile]"] == "email,external_id"


def test_list_lookup_filters_the_list_members_by_email(traffic: list[Sent]) -> None:
    [lookup] = [s for s in traffic if "/lists/" in s.path and "filter" in dict(s.params)]
    assert operation_for(lookup.method, lookup.path).name == "get_profiles_for_list"
    assert dict(lookup.params) == {
        "filter": 'any(email,["p0@example.com","we\\"ird\\\\@example.com"])',
        "page[size]": "100",
        "fields[profile]": "email,external_id",
    }


def test_traits_go_as_profile_fields_and_custom_properties(traffic: list[Sent]) -> None:
    [job] = [s for s in traffic if s.method == "POST" and s.path == "/api/profile-bulk-import-jobs"]
    profiles = job.json()["data"]["attributes"]["profiles"]["data"]
    [with_traits] = [p for p in profiles if p["attributes"].get("email") == "t@example.com"]
    assert with_traits["attributes"] == {
        "email": "t@example.com",
        **TRAIT_FIELDS,
        "properties": PROPS,
    }
    model = model_class("ProfileImportJobCreateQuery").model_validate(job.json())
    attrs = model.data.attributes.profiles.data[profiles.index(with_traits)].attributes
    assert (attrs.first_name, attrs.phone_number, attrs.properties) == (
        "Ann",
        "+14155552671",
        PROPS,
    )


def test_list_read_back_asks_for_identifiers_100_a_page(traffic: list[Sent]) -> None:
    [read] = [
        s
        for s in traffic
        if s.method == "GET"
        and s.path.endswith("/profiles")
        and "/lists/" in s.path
        and "/relationships/" not in s.path
        and "filter" not in dict(s.params)
    ]
    assert operation_for(read.method, read.path).name == "get_profiles_for_list"
    params = dict(read.params)
    assert params == {
        "page[size]": "100",
        "fields[profile]": "email,external_id,subscriptions.email.marketing.suppression",
        "additional-fields[profile]": "subscriptions",
    }


def test_nothing_goes_to_subscription_endpoints(traffic: list[Sent]) -> None:
    names = {operation_for(s.method, s.path).name for s in traffic}
    assert not {n for n in names if "subscri" in n}, names


# -- the simulator refuses what the official models refuse ---------------------------------------

GOOD_JOB: dict[str, Any] = {
    "data": {
        "type": "profile-bulk-import-job",
        "attributes": {
            "profiles": {"data": [{"type": "profile", "attributes": {"email": "a@b.co"}}]}
        },
        "relationships": {"lists": {"data": [{"type": "list", "id": "LIST"}]}},
    }
}


def _job(mutate: Any) -> dict[str, Any]:
    import copy

    body = copy.deepcopy(GOOD_JOB)
    mutate(body)
    return body


_PROFILE_BY_ID = {"data": {"type": "profile", "id": "01ABC", "attributes": {}}}
BAD_BODIES: list[tuple[str, str, dict[str, Any], str]] = [
    (
        "bulk_import",
        "wrong type",
        _job(lambda b: b["data"].update(type="profile-import-job")),
        "/data/type",
    ),
    (
        "bulk_import",
        "profiles not wrapped in data",
        _job(lambda b: b["data"]["attributes"].update(profiles=[{"type": "profile"}])),
        "/data/attributes/profiles",
    ),
    (
        "bulk_import",
        "email is a number",
        _job(
            lambda b: b["data"]["attributes"]["profiles"]["data"][0]["attributes"].update(email=5)
        ),
        "/data/attributes/profiles/data/0/attributes/email",
    ),
    (
        "bulk_import",
        "profile without attributes",
        _job(lambda b: b["data"]["attributes"]["profiles"]["data"][0].pop("attributes")),
        "/data/attributes/profiles/data/0/attributes",
    ),
    (
        "bulk_import",
        "list without id",
        _job(lambda b: b["data"]["relationships"]["lists"]["data"][0].pop("id")),
        "/data/relationships/lists/data/0/id",
    ),
    ("list_members_add", "profile ids as strings", {"data": ["01ABC"]}, "/data/0"),
    (
        "list_members_add",
        "wrong resource type",
        {"data": [{"type": "list", "id": "x"}]},
        "/data/0/type",
    ),
    ("list_members_delete", "id missing", {"data": [{"type": "profile"}]}, "/data/0/id"),
    ("profile_import", "attributes missing", {"data": {"type": "profile"}}, "/data/attributes"),
    (
        "bulk_import",
        "properties is a list",
        _job(
            lambda b: b["data"]["attributes"]["profiles"]["data"][0]["attributes"].update(
                properties=["plan"]
            )
        ),
        "/data/attributes/profiles/data/0/attributes/properties",
    ),
    (
        "bulk_import",
        "first_name is a number",
        _job(
            lambda b: b["data"]["attributes"]["profiles"]["data"][0]["attributes"].update(
                first_name=7
            )
        ),
        "/data/attributes/profiles/data/0/attributes/first_name",
    ),
    (
        "profile_import",
        "phone_number is a number",
        {
            "data": {
                "type": "profile",
                "attributes": {"email": "a@b.co", "phone_number": 14155552671},
            }
        },
        "/data/attributes/phone_number",
    ),
    (
        "profile_import",
        "external_id is a number",
        {"data": {"type": "profile", "attributes": {"external_id": 12}}},
        "/data/attributes/external_id",
    ),
    (
        "list_create",
        "name missing",
        {"data": {"type": "list", "attributes": {}}},
        "/data/attributes/name",
    ),
    (
        "list_create",
        "unknown opt-in process",
        {"data": {"type": "list", "attributes": {"name": "N", "opt_in_process": "none"}}},
        "/data/attributes/opt_in_process",
    ),
    (
        "deletion_job",
        "wrong deletion type",
        {"data": {"type": "profile-deletion-job", "attributes": {"profile": _PROFILE_BY_ID}}},
        "/data/type",
    ),
    (
        "deletion_job",
        "profile not wrapped in data",
        {
            "data": {
                "type": "data-privacy-deletion-job",
                "attributes": {"profile": {"type": "profile", "id": "01ABC"}},
            }
        },
        "/data/attributes/profile/data",
    ),
]
_MODELS = {
    "bulk_import": "ProfileImportJobCreateQuery",
    "profile_import": "ProfileUpsertQuery",
    "list_members_add": "ListMembersAddQuery",
    "list_members_delete": "ListMembersDeleteQuery",
    "list_create": "ListCreateQuery",
    "deletion_job": "DataPrivacyCreateDeletionJobQuery",
}


@pytest.mark.parametrize(
    ("kind", "why", "body", "pointer"), BAD_BODIES, ids=[b[1] for b in BAD_BODIES]
)
def test_official_model_and_both_simulator_validators_refuse(
    kind: Any, why: str, body: dict[str, Any], pointer: str
) -> None:
    with pytest.raises(Exception):  # noqa: B017 - pydantic.ValidationError, whatever its path
        model_class(_MODELS[kind]).model_validate(body)
    official = validate_body(kind, body, use_models=True)
    fallback = validate_body(kind, body, use_models=False)
    assert pointer in {p.pointer for p in official}, official
    assert pointer in {p.pointer for p in fallback}, fallback


@pytest.mark.parametrize("use_models", [True, False])
def test_both_validators_accept_what_the_client_sends(
    traffic: list[Sent], use_models: bool
) -> None:
    kinds = {
        "bulk_import_profiles": "bulk_import",
        "create_or_update_profile": "profile_import",
        "add_profiles_to_list": "list_members_add",
        "remove_profiles_from_list": "list_members_delete",
        "create_list": "list_create",
        "request_profile_deletion": "deletion_job",
    }
    for sent in (s for s in traffic if s.body):
        kind: Any = kinds[operation_for(sent.method, sent.path).name]
        assert validate_body(kind, sent.json(), use_models=use_models) == []


@pytest.mark.parametrize("use_models", [True, False])
def test_simulator_answers_400_with_the_pointer_over_http(env: Env, use_models: bool) -> None:
    env.sim._use_models = use_models  # the same server, each validator in turn
    body = _job(
        lambda b: b["data"]["attributes"]["profiles"]["data"][0]["attributes"].update(
            email=["not", "a", "string"]
        )
    )
    body["data"]["relationships"]["lists"]["data"][0]["id"] = env.list_id
    response = httpx.post(
        f"{env.base_url}/api/profile-bulk-import-jobs",
        json=body,
        headers={
            "Authorization": f"Klaviyo-API-Key {env.key}",
            "revision": REVISION,
            "content-type": "application/vnd.api+json",
        },
    )
    assert response.status_code == 400
    errors = response.json()["errors"]
    assert {"id", "code", "title", "detail", "source"} <= set(errors[0])
    assert errors[0]["source"]["pointer"] == "/data/attributes/profiles/data/0/attributes/email"
    assert env.sim.requests(endpoint=Endpoint.CREATE_BULK_IMPORT_JOB, status=400)


def test_simulator_error_bodies_match_the_spec_error_shape() -> None:
    sim = Simulator()
    account = sim.create_account()
    key = sim.create_key(account)
    for response in (
        sim.call("GET", "/api/lists/nope00", key=key),
        sim.call("GET", "/api/lists/nope00", key="pk_unknownunknownunknown"),
        sim.call("GET", "/api/lists/nope00", key=key, headers={"revision": None}),
    ):
        errors = response.json()["errors"]
        for error in errors:
            # ClientError in the spec requires id, code, title, detail (all strings)
            assert all(
                isinstance(error[k], str) and error[k] for k in ("id", "code", "title", "detail")
            )


def test_simulator_validates_without_the_sdk_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from segops_sync.klaviyo_sim import official_model

    for name in [m for m in sys.modules if m.startswith("openapi_client")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "openapi_client", None)
    assert official_model("bulk_import") is None
    sim = Simulator()
    account = sim.create_account()
    key = sim.create_key(account)
    list_id = sim.create_list(account)
    bad = _job(lambda b: b["data"].update(type="nope"))
    bad["data"]["relationships"]["lists"]["data"][0]["id"] = list_id
    refused = sim.call("POST", "/api/profile-bulk-import-jobs", key=key, json_body=bad)
    assert refused.status == 400
    assert refused.json()["errors"][0]["source"]["pointer"] == "/data/type"
    good = _job(lambda b: None)
    good["data"]["relationships"]["lists"]["data"][0]["id"] = list_id
    assert sim.call("POST", "/api/profile-bulk-import-jobs", key=key, json_body=good).status == 202


def test_simulator_list_answers_parse_with_the_official_response_models(env: Env) -> None:
    """GET /api/lists (every page), POST /api/lists and GET /api/lists/{id} with profile_count
    answer what the SDK's response models accept, links.next included."""
    for name in ("B list", "A list"):
        env.sim.create_list(env.account_id, name)
    headers = {"revision": REVISION, "content-type": "application/vnd.api+json"}
    created = env.sim.call(
        "POST",
        "/api/lists",
        key=env.key,
        headers=headers,
        json_body={"data": {"type": "list", "attributes": {"name": "C list"}}},
    )
    assert created.status == 201
    model_class("PostListCreateResponse").model_validate(created.json())
    page = env.sim.call(
        "GET", "/api/lists", key=env.key, params={"page[size]": "2", "sort": "name"}
    )
    doc = page.json()
    model_class("GetListListResponseCollectionCompoundDocument").model_validate(doc)
    assert [d["attributes"]["name"] for d in doc["data"]] == ["A list", "B list"]
    assert "page%5Bcursor%5D=" in doc["links"]["next"]
    counted = env.sim.call(
        "GET",
        f"/api/lists/{env.list_id}",
        key=env.key,
        params={"additional-fields[list]": "profile_count"},
    )
    doc = counted.json()
    model_class("GetListRetrieveResponseCompoundDocument").model_validate(doc)
    assert doc["data"]["attributes"]["profile_count"] == 0


def test_deletion_requests_name_the_profile_by_one_identifier(traffic: list[Sent]) -> None:
    deletions = [s.json() for s in traffic if s.path == "/api/data-privacy-deletion-jobs"]
    profiles = [d["data"]["attributes"]["profile"]["data"] for d in deletions]
    assert [d["data"]["type"] for d in deletions] == ["data-privacy-deletion-job"] * 2
    assert profiles[0]["type"] == "profile" and profiles[0]["attributes"] == {}
    assert profiles[1] == {"type": "profile", "attributes": {"email": "p1@example.com"}}
