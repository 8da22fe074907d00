"""One spelling of each shape: the JSON, the OpenAPI schemas and the input rules agree because
they come from the same tables, checked here without a server or a database."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from segops_sync.api import create_app
from segops_sync.api_input import CREATE_FIELDS, PATCH_FIELDS
from segops_sync.connectors import validate_api_key, validate_list_id, validate_segment_id
from segops_sync.db.models import Connector, MassRemovalApproval, SyncRun
from segops_sync.errors import InputError
from segops_sync.openapi import CONNECTOR, RUN
from segops_sync.shapes import (
    CONNECTOR_FIELDS,
    SETTABLE_STATUSES,
    JsonField,
    connector_json,
    run_json,
    shape_json,
    shape_schema,
)
from segops_sync.states import ConnectorStatus, RunStatus, Trigger

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def _connector() -> Connector:
    return Connector(
        id="c1",
        type="klaviyo",
        segment_id="seg-1",
        list_id="AbC123",
        api_key_hint="pk_…1234",
        status=ConnectorStatus.ACTIVE,
        last_synced_at=NOW,
        traits=["first_name"],
        opt_in_process="single_opt_in",
    )


def _run() -> SyncRun:
    run = SyncRun(
        id="r1",
        connector_id="c1",
        trigger=Trigger.RESYNC,
        status=RunStatus.SUCCEEDED,
        started_at=NOW,
        finished_at=NOW,
        added=3,
        removed=1,
        rejected=2,
        updated=0,
        traits_dropped=0,
        suppressed=0,
        verify_in_list=4,
        verify_expected=4,
        verify_missing=0,
        verify_extra=0,
    )
    run.approval = MassRemovalApproval(
        approved_by="ops", approved_at=NOW, expires_at=NOW + timedelta(hours=1), held_run_id=None
    )
    return run


def _names(schema: dict[str, Any]) -> list[str]:
    return list(schema["properties"])


def test_the_json_of_a_connector_has_the_published_schemas_fields_in_order() -> None:
    doc = connector_json(_connector())
    assert list(doc) == _names(CONNECTOR) == CONNECTOR["required"]
    assert doc["last_synced_at"] == NOW.isoformat() and doc["api_key"] == "pk_…1234"


def test_the_json_of_a_run_and_its_nested_objects_have_the_published_fields() -> None:
    doc = run_json(_run())
    assert list(doc) == _names(RUN) == RUN["required"]
    assert list(doc["verify"]) == _names(RUN["properties"]["verify"])
    assert list(doc["approval"]) == _names(RUN["properties"]["approval"])
    assert doc["rejected_members"] == "/v1/connectors/c1/runs/r1/rejected"


def test_the_published_document_takes_its_answer_schemas_from_the_shapes() -> None:
    schemas = create_app("token").state.openapi["components"]["schemas"]
    assert schemas["Connector"] == CONNECTOR == shape_schema(CONNECTOR_FIELDS)
    assert schemas["Run"] == RUN


def test_a_field_added_to_a_table_is_in_the_json_and_the_schema_alike() -> None:
    added = (*CONNECTOR_FIELDS, JsonField("extra", {"type": "integer"}, lambda c: 7))
    doc = shape_json(added, _connector())
    schema = shape_schema(added)
    assert doc["extra"] == 7 and schema["properties"]["extra"] == {"type": "integer"}
    assert list(doc) == _names(schema) == schema["required"]


@pytest.mark.parametrize("value", ["AbC123", "abc12", "AbC1234", "AbC-12", ""])
def test_the_list_id_pattern_published_is_the_one_checked(value: str) -> None:
    published = re.fullmatch(CREATE_FIELDS["list_id"].schema["pattern"], value) is not None
    assert PATCH_FIELDS["list_id"].schema["pattern"] == CREATE_FIELDS["list_id"].schema["pattern"]
    try:
        validate_list_id(value)
        checked = True
    except InputError:
        checked = False
    assert published == checked


@pytest.mark.parametrize("value", ["pk_abcdefgh", "pk_abc", "pk_has space12", "sk_abcdefgh"])
def test_the_api_key_pattern_published_is_the_one_checked(value: str) -> None:
    published = re.fullmatch(CREATE_FIELDS["api_key"].schema["pattern"], value) is not None
    try:
        validate_api_key(value)
        checked = True
    except InputError:
        checked = False
    assert published == checked


def test_the_segment_id_length_and_statuses_published_are_the_ones_checked() -> None:
    longest = CREATE_FIELDS["segment_id"].schema["maxLength"]
    validate_segment_id("s" * longest)
    with pytest.raises(InputError, match=f"1 to {longest} characters"):
        validate_segment_id("s" * (longest + 1))
    assert PATCH_FIELDS["status"].schema["enum"] == list(SETTABLE_STATUSES)
    assert SETTABLE_STATUSES == ("active", "inactive")


def test_a_refused_type_or_status_names_the_allowed_ones() -> None:
    """Both are refused before the database is touched: no session is needed."""
    from segops_sync.connectors import create_connector, update_connector

    nothing: Any = None
    with pytest.raises(InputError, match=r"^connector type is not supported: use 'klaviyo'$"):
        create_connector(
            nothing, nothing, segment_id="s", list_id="AbC123", api_key="k", connector_type="x"
        )
    with pytest.raises(InputError, match=r"^status is not allowed: use 'active' or 'inactive'$"):
        update_connector(nothing, nothing, "c1", status="error")
