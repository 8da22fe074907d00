"""Request-body validation: Klaviyo's official generated models when available, else our own.

``openapi_client`` ships with the ``klaviyo-api`` package, a test dependency only, so it is
imported lazily. The fallback checks the same structure (types, required members, enum values)
for the bodies the client sends.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

BodyKind = Literal[
    "bulk_import",
    "profile_import",
    "list_members_add",
    "list_members_delete",
    "list_create",
    "deletion_job",
]

_MODELS: dict[str, tuple[str, str]] = {
    "bulk_import": ("profile_import_job_create_query", "ProfileImportJobCreateQuery"),
    "profile_import": ("profile_upsert_query", "ProfileUpsertQuery"),
    "list_members_add": ("list_members_add_query", "ListMembersAddQuery"),
    "list_members_delete": ("list_members_delete_query", "ListMembersDeleteQuery"),
    "list_create": ("list_create_query", "ListCreateQuery"),
    "deletion_job": (
        "data_privacy_create_deletion_job_query",
        "DataPrivacyCreateDeletionJobQuery",
    ),
}
_PROFILE_STRINGS = (
    "email",
    "phone_number",
    "external_id",
    "_kx",
    "first_name",
    "last_name",
    "organization",
    "locale",
    "title",
    "image",
)


@dataclass(frozen=True)
class Problem:
    pointer: str
    detail: str


def official_model(kind: BodyKind) -> Any | None:
    """The generated pydantic model class for a body, or None if openapi_client is absent."""
    module_name, class_name = _MODELS[kind]
    try:
        module = importlib.import_module(f"openapi_client.models.{module_name}")
    except ImportError:
        return None
    return getattr(module, class_name, None)


def validate_body(kind: BodyKind, body: Any, *, use_models: bool | None = None) -> list[Problem]:
    """Problems found in a parsed JSON body; empty when it is valid.

    use_models: None = the official models if importable, True = require them, False = fallback.
    """
    model = official_model(kind) if use_models is not False else None
    if use_models and model is None:
        raise RuntimeError("openapi_client is not installed")
    if model is not None:
        return _validate_with_model(model, body)
    return _FALLBACK[kind](body)


def _validate_with_model(model: Any, body: Any) -> list[Problem]:
    try:
        model.model_validate(body)
    except Exception as exc:  # pydantic.ValidationError; kept generic to avoid importing it here
        errors = getattr(exc, "errors", None)
        if not callable(errors):
            return [Problem("/data", str(exc))]
        return [
            Problem(_pointer(err.get("loc", ())), str(err.get("msg", "invalid")))
            for err in errors()
        ] or [Problem("/data", "invalid body")]
    return []


def _pointer(loc: Any) -> str:
    parts = [str(p) for p in loc if isinstance(p, int | str)]
    return "/" + "/".join(parts) if parts else "/data"


# -- the fallback: the same structure, checked by hand --------------------------------------------


def _check_bulk(body: Any) -> list[Problem]:
    problems: list[Problem] = []
    data = _object(body, "data", "", problems)
    if data is None:
        return problems
    _enum(data, "type", "profile-bulk-import-job", "/data", problems)
    attrs = _object(data, "attributes", "/data", problems)
    if attrs is not None:
        profiles = _object(attrs, "profiles", "/data/attributes", problems)
        if profiles is not None:
            items = _array(profiles, "data", "/data/attributes/profiles", problems)
            for i, item in enumerate(items or []):
                _check_profile(item, f"/data/attributes/profiles/data/{i}", problems)
    if "relationships" in data and data["relationships"] is not None:
        rel = _object(data, "relationships", "/data", problems)
        if rel is not None and rel.get("lists") is not None:
            lists = _object(rel, "lists", "/data/relationships", problems)
            if lists is not None and lists.get("data") is not None:
                entries = _array(lists, "data", "/data/relationships/lists", problems)
                for i, entry in enumerate(entries or []):
                    where = f"/data/relationships/lists/data/{i}"
                    if not isinstance(entry, dict):
                        problems.append(Problem(where, "Input should be an object"))
                        continue
                    _enum(entry, "type", "list", where, problems)
                    _string(entry, "id", where, problems, required=True)
    return problems


def _check_upsert(body: Any) -> list[Problem]:
    problems: list[Problem] = []
    if not isinstance(body, dict) or "data" not in body:
        return [Problem("/data", "Field required")]
    _check_profile(body["data"], "/data", problems)
    return problems


def _check_members(body: Any) -> list[Problem]:
    problems: list[Problem] = []
    if not isinstance(body, dict):
        return [Problem("/data", "Input should be an object")]
    items = _array(body, "data", "", problems)
    for i, item in enumerate(items or []):
        where = f"/data/{i}"
        if not isinstance(item, dict):
            problems.append(Problem(where, "Input should be an object"))
            continue
        _enum(item, "type", "profile", where, problems)
        _string(item, "id", where, problems, required=True)
    return problems


def _check_list_create(body: Any) -> list[Problem]:
    problems: list[Problem] = []
    data = _object(body, "data", "", problems)
    if data is None:
        return problems
    _enum(data, "type", "list", "/data", problems)
    attrs = _object(data, "attributes", "/data", problems)
    if attrs is not None:
        _string(attrs, "name", "/data/attributes", problems, required=True)
        opt_in = attrs.get("opt_in_process")
        if opt_in is not None and opt_in not in ("double_opt_in", "single_opt_in"):
            where = "/data/attributes/opt_in_process"
            problems.append(Problem(where, "Input should be 'double_opt_in' or 'single_opt_in'"))
    return problems


def _check_deletion_job(body: Any) -> list[Problem]:
    problems: list[Problem] = []
    data = _object(body, "data", "", problems)
    if data is None:
        return problems
    _enum(data, "type", "data-privacy-deletion-job", "/data", problems)
    attrs = _object(data, "attributes", "/data", problems)
    profile = None if attrs is None else _object(attrs, "profile", "/data/attributes", problems)
    where = "/data/attributes/profile"
    item = None if profile is None else _object(profile, "data", where, problems)
    if item is None:
        return problems
    where += "/data"
    _enum(item, "type", "profile", where, problems)
    _string(item, "id", where, problems, required=False)
    item_attrs = _object(item, "attributes", where, problems)
    if item_attrs is not None:
        for name in ("email", "phone_number"):
            _string(item_attrs, name, f"{where}/attributes", problems, required=False)
    return problems


def _check_profile(item: Any, where: str, problems: list[Problem]) -> None:
    if not isinstance(item, dict):
        problems.append(Problem(where, "Input should be an object"))
        return
    _enum(item, "type", "profile", where, problems)
    _string(item, "id", where, problems, required=False)
    attrs = _object(item, "attributes", where, problems)
    if attrs is None:
        return
    for name in _PROFILE_STRINGS:
        _string(attrs, name, f"{where}/attributes", problems, required=False)
    for name in ("location", "properties"):
        value = attrs.get(name)
        if value is not None and not isinstance(value, dict):
            problems.append(Problem(f"{where}/attributes/{name}", "Input should be an object"))
    meta = item.get("meta")
    if meta is not None and not isinstance(meta, dict):
        problems.append(Problem(f"{where}/meta", "Input should be an object"))


def _object(parent: Any, name: str, where: str, problems: list[Problem]) -> dict[str, Any] | None:
    if not isinstance(parent, dict) or name not in parent:
        problems.append(Problem(f"{where}/{name}", "Field required"))
        return None
    value = parent[name]
    if not isinstance(value, dict):
        problems.append(Problem(f"{where}/{name}", "Input should be an object"))
        return None
    return value


def _array(
    parent: dict[str, Any], name: str, where: str, problems: list[Problem]
) -> list[Any] | None:
    if name not in parent:
        problems.append(Problem(f"{where}/{name}", "Field required"))
        return None
    value = parent[name]
    if not isinstance(value, list):
        problems.append(Problem(f"{where}/{name}", "Input should be a valid list"))
        return None
    return value


def _enum(
    parent: dict[str, Any], name: str, expected: str, where: str, problems: list[Problem]
) -> None:
    if name not in parent:
        problems.append(Problem(f"{where}/{name}", "Field required"))
    elif parent[name] != expected:
        problems.append(Problem(f"{where}/{name}", f"Input should be '{expected}'"))


def _string(
    parent: dict[str, Any], name: str, where: str, problems: list[Problem], *, required: bool
) -> None:
    if name not in parent:
        if required:
            problems.append(Problem(f"{where}/{name}", "Field required"))
        return
    value = parent[name]
    if value is None and not required:
        return
    if not isinstance(value, str):
        problems.append(Problem(f"{where}/{name}", "Input should be a valid string"))


_FALLBACK = {
    "bulk_import": _check_bulk,
    "profile_import": _check_upsert,
    "list_members_add": _check_members,
    "list_members_delete": _check_members,
    "list_create": _check_list_create,
    "deletion_job": _check_deletion_job,
}
