"""The API's body checks and OpenAPI document, without a server or a database."""

from __future__ import annotations

import json

import pytest

from segops_sync.api import create_app
from segops_sync.api_input import (
    CREATE_FIELDS,
    MAX_DEPTH,
    PATCH_FIELDS,
    BodyField,
    body_schema,
    parse_body,
    storable,
)
from segops_sync.errors import InputError


def test_storable_refuses_what_postgresql_text_cannot_hold() -> None:
    assert storable("seg-1 é ✓ 🙂")
    assert not storable("a\x00b")
    assert not storable("a\ud800")  # an unpaired surrogate, as json.loads gives for "\ud800"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"[1]", "body must be a JSON object"),
        (b"{", "body is not valid JSON"),
        (b"\xff", "body is not valid JSON"),
        (b'{"status": 1}', "status must be a string"),
        (b'{"status": "a\\u0000"}', "status holds a character that cannot be stored"),
        (b'{"list_id": "\\ud800"}', "list_id holds a character that cannot be stored"),
        (b'{"nope": "x", "\\u0000": 1}', "2 unknown field(s): the fields are status, list_id"),
    ],
)
def test_bodies_are_refused_with_the_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(InputError) as caught:
        parse_body(raw, PATCH_FIELDS)
    assert reason in str(caught.value)
    # The message can always travel back as JSON.
    json.dumps({"error": str(caught.value)}, ensure_ascii=False).encode("utf-8")


DEEP_BODIES = [
    b"[" * 5000 + b"]" * 5000,  # json.loads raised RecursionError: the API answered 500
    b'{"status": ' + b"[" * 3000 + b"]" * 3000 + b"}",
    b"{" + b'"a":{' * 2000 + b"1" + b"}" * 2001,
    b'{"traits": ' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}",  # one level too many
    b"[" * 40000,  # not even JSON: refused for its depth before it is parsed
]


def test_deeply_nested_bodies_are_refused_in_one_line() -> None:
    for raw in DEEP_BODIES:
        with pytest.raises(InputError, match=f"too deeply: at most {MAX_DEPTH} levels"):
            parse_body(raw, PATCH_FIELDS)
    # brackets inside strings (escaped quotes too) are text, not nesting
    text = "[{" * 50 + '\\"' + "[" * 50
    raw = json.dumps({"traits": [text], "status": "active"}).encode()
    assert parse_body(raw, PATCH_FIELDS) == {"traits": [text], "status": "active"}


def test_an_unknown_field_is_refused_without_its_name() -> None:
    """A key pasted as a field's name comes back neither."""
    key = "pk_LiveKeyPastedAsAName123"
    with pytest.raises(InputError) as caught:
        parse_body(json.dumps({key: "x", "status": "active"}).encode(), PATCH_FIELDS)
    assert key not in str(caught.value)
    assert "1 unknown field(s): the fields are status, list_id, api_key, traits" in str(
        caught.value
    )


def test_required_fields_and_an_empty_patch() -> None:
    with pytest.raises(InputError, match="segment_id is required"):
        parse_body(b'{"list_id": "AbC123", "api_key": "pk_x"}', CREATE_FIELDS)
    assert parse_body(b"", PATCH_FIELDS) == {}


def test_a_list_of_strings_field_is_one_more_table_entry() -> None:
    fields = {**PATCH_FIELDS, "traits": BodyField({"type": "array", "items": {"type": "string"}})}
    assert parse_body(b'{"traits": ["first_name", "plan"]}', fields) == {
        "traits": ["first_name", "plan"]
    }
    for raw, reason in [
        (b'{"traits": "first_name"}', "traits must be a list of strings"),
        (b'{"traits": [1]}', "each of traits must be a string"),
        (b'{"traits": ["a\\u0000"]}', "each of traits holds a character"),
    ]:
        with pytest.raises(InputError, match=reason):
            parse_body(raw, fields)
    assert body_schema(fields)["properties"]["traits"]["type"] == "array"


def test_the_openapi_document_covers_every_route_with_json_errors() -> None:
    doc = create_app("token").state.openapi
    assert doc["openapi"] == "3.0.3"
    assert doc["components"]["schemas"]["NewConnector"] == body_schema(CREATE_FIELDS)
    assert doc["components"]["schemas"]["NewConnector"]["required"] == [
        "segment_id",
        "list_id",
        "api_key",
    ]
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert operation["operationId"], (method, path)
            assert responses["401"] == {"$ref": "#/components/responses/Unauthorized"}
            assert "default" in responses
            if "{id}" in path:
                assert responses["404"] and operation["parameters"][0]["name"] == "id"
            if "requestBody" in operation:
                assert {"413", "422"} <= set(responses)
    assert "/activations" not in doc["paths"]  # a page, not part of the API
