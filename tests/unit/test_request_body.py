"""BodyRoute (api/request_body.py) on a small app: large bodies are parsed and validated in a
thread, a body with too many values is a 413 before parsing, invalid bodies are reported as
before (after the dependencies), and no stand-in is ever taken for a valid body."""

import threading
from collections.abc import Iterator
from typing import Annotated, Any

import pytest
from fastapi import APIRouter, Body, Depends, FastAPI, Request
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from pydantic import BaseModel, field_validator

from api.errors import install_error_handlers
from api.main import create_app
from api.middleware import JsonBodyMiddleware
from api.request_body import INLINE_BYTES, BodyParser, BodyRoute, within_budget


class Note(BaseModel):
    text: str
    tags: list[str] = []

    @field_validator("text")
    @classmethod
    def _seen(cls, text: str) -> str:
        validated_on.append(threading.get_ident())
        return text


class Settings(BaseModel):
    """Every field has a default: `{}` is valid, so only a real body may pass."""

    limit: int = 10
    name: str = "x"


validated_on: list[int] = []
dependencies_ran: list[str] = []


def _dependency(request: Request) -> None:
    dependencies_ran.append(request.url.path)


def _app(max_values: int = 1_000) -> FastAPI:
    router = APIRouter(route_class=BodyRoute, dependencies=[Depends(_dependency)])

    @router.post("/notes")
    def add_note(note: Note) -> dict[str, Any]:
        return {"text_chars": len(note.text), "tags": len(note.tags), "thread": loop_ident[0]}

    @router.patch("/settings")
    def update(body: Annotated[Settings | None, Body()] = None) -> dict[str, Any]:
        return {"body": None if body is None else body.model_dump()}

    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.add_middleware(JsonBodyMiddleware)
    app.state.body_parser = BodyParser(max_values)

    @app.middleware("http")
    async def loop_thread(request: Request, call_next: Any) -> Any:
        loop_ident[0] = threading.get_ident()
        return await call_next(request)

    return app


loop_ident = [0]


@pytest.fixture
def client() -> Iterator[TestClient]:
    validated_on.clear()
    dependencies_ran.clear()
    with TestClient(_app()) as test_client:
        yield test_client


def test_small_bodies_are_validated_in_place_and_large_ones_in_a_thread(
    client: TestClient,
) -> None:
    small = client.post("/notes", json={"text": "hi"})
    assert small.status_code == 200, small.text
    assert validated_on == [loop_ident[0]]
    validated_on.clear()
    large = client.post("/notes", json={"text": "x" * (2 * INLINE_BYTES)})
    assert large.status_code == 200, large.text
    assert large.json()["text_chars"] == 2 * INLINE_BYTES
    assert validated_on and validated_on[0] != loop_ident[0]


def test_too_many_values_is_413_before_parsing(client: TestClient) -> None:
    body = b'{"text":"x","tags":[' + b",".join([b'"a"'] * 5_000) + b"]}"
    response = client.post("/notes", content=body)
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["type"] == "request_too_large" and "1000 JSON values" in error["message"]
    assert validated_on == []


@pytest.mark.parametrize("size", [100, 4 * INLINE_BYTES])
def test_invalid_bodies_report_their_own_errors_after_the_dependencies(
    client: TestClient, size: int
) -> None:
    response = client.post("/notes", json={"text": 5, "tags": ["x" * size, 7]})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert message == "text: Input should be a valid string; tags.1: Input should be a valid string"
    assert dependencies_ran == ["/notes"]


def test_many_errors_are_counted_not_listed(client: TestClient) -> None:
    response = client.post("/notes", json={"text": "x", "tags": list(range(500))})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert message.startswith("tags.0: Input should be a valid string; tags.1:")
    assert message.endswith("(and 480 more errors)")


def test_invalid_json_is_still_named(client: TestClient) -> None:
    for body in (b'{"text": ', b'{"text": "x"' + b" " * (2 * INLINE_BYTES) + b"garbage"):
        response = client.post("/notes", content=body)
        assert response.status_code == 400
        assert response.json()["error"]["message"].startswith("invalid JSON body")


@pytest.mark.parametrize("size", [0, 4 * INLINE_BYTES])
def test_an_invalid_optional_body_is_never_taken_for_no_body(client: TestClient, size: int) -> None:
    """`{}` and `None` would both be valid here: the stand-in for an invalid body must not be."""
    response = client.patch("/settings", json={"limit": "many", "name": "y" * size})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == (
        "limit: Input should be a valid integer, unable to parse string as an integer"
    )
    assert client.patch("/settings", json={"limit": 3}).json() == {
        "body": {"limit": 3, "name": "x"}
    }
    assert client.patch("/settings").json() == {"body": None}


def test_within_budget_does_not_count_inside_strings() -> None:
    assert within_budget(b'{"a":[1,2,3]}', 10)
    assert not within_budget(b"[" + b",".join([b"{}"] * 20) + b"]", 10)
    text = b'{"text":"' + b", [{" * 1_000 + b'\\" ,,"}'
    assert within_budget(text, 10)


def _api_routes(routes: list[Any]) -> Iterator[APIRoute]:
    for route in routes:
        included = getattr(route, "original_router", None)  # FastAPI >= 0.160 keeps includes
        if included is not None:
            yield from _api_routes(included.routes)
        elif isinstance(route, APIRoute):
            yield route


def test_every_route_with_a_body_is_a_body_route() -> None:
    """A route added later without `route_class=BodyRoute` would parse on the event loop."""
    with_body = [r for r in _api_routes(create_app().routes) if r.body_field is not None]
    assert len(with_body) >= 7
    for route in with_body:
        assert isinstance(route, BodyRoute), route.path
