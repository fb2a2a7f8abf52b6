"""The annotation page and its JSON API: FastAPI, served by uvicorn; the page is one static file (`page.html`,
plain HTML and JavaScript, so that keyboard shortcuts and a browser test need no front-end framework).

    GET  /                       the page
    GET  /api/study              the task's title and what the page needs to know of the study
    POST /api/annotators         {"name"}: start (or resume) an annotator -> their state
    GET  /api/state?annotator=   where an annotator stands: progress and the next item
    POST /api/answers            {"annotator", "item", "answer", "cells", "incorrect", "seconds"} -> next state
    GET  /api/images/{item}      the image of one item of the study

Security: the server binds 127.0.0.1 unless told otherwise; an image is found by its item number in the
database, so no text from the browser ever becomes a file path; unknown annotators and items are 404, a
second answer to an item or an answer to another than the annotator's next item 409 (with their state, so a
stale tab catches up), malformed requests 400 naming the field, never echoing the value (FastAPI's validation,
extra fields refused; integers beyond SQLite's 64 bits, NaN and negative seconds too), a body over
`MAX_BODY_BYTES` 413 unread; a full disk 503 with nothing stored (the page keeps the answer to send again); with
a token every request needs it (`?token=` or the `X-Annotate-Token` header) or gets 403; there is no other
route (no static folder, no API docs).
"""

import hmac
import ipaddress
import logging
import socket
import sqlite3
from collections.abc import Callable
from importlib import resources
from typing import Annotated, Any

from probing.baselines.annotate.store import AnnotationStore, NotAssigned, NotNext, StudyFull, UnknownAnnotator
from probing.baselines.annotate.study import MAX_CELLS, shown
from probing.core.errors import ProbingError
from probing.data.boxes import CELL_NAMES

log = logging.getLogger(__name__)

NAME_PATTERN = r"^[\w][\w .'-]*$"  # letters (any script), digits, and inner spaces, dots, apostrophes, hyphens
NAME_LENGTH = 40
TOKEN_HEADER = "X-Annotate-Token"
MAX_BODY_BYTES = 16 * 1024  # an answer is a few hundred bytes
MAX_ID = 2**63 - 1  # SQLite's largest integer
PAGE_HEADERS = {
    # the page loads nothing from elsewhere and may not be framed; the token in its URL is never sent on
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def page_html() -> str:
    return resources.files("probing.baselines.annotate").joinpath("page.html").read_text(encoding="utf-8")


def create_app(store: AnnotationStore, token: str | None = None):
    """The FastAPI application of one study's database."""
    from fastapi import Depends, FastAPI
    from fastapi.exceptions import RequestValidationError

    app = FastAPI(
        title="probing annotate",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(_token_check(token))],
    )
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    app.add_exception_handler(RequestValidationError, _malformed)
    api = _StudyApi(store)
    start, answer = _request_models()
    _add_page_routes(app, api)
    _add_annotator_routes(app, api, start, answer)
    _add_image_route(app, api)
    return app


def _request_models() -> tuple[type, type]:
    """The request bodies (Start, Answer), strict and closed; built when an app is (pydantic loads lazily)."""
    from pydantic import BaseModel, ConfigDict, Field, StringConstraints

    Name = Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=NAME_LENGTH, pattern=NAME_PATTERN)
    ]

    class Start(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        name: Name

    class Answer(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        annotator: Name
        item: int = Field(ge=0, le=MAX_ID)
        answer: bool
        cells: list[Annotated[int, Field(ge=0, lt=len(CELL_NAMES))]] = Field(default_factory=list, max_length=MAX_CELLS)
        incorrect: bool = False
        seconds: float | None = Field(default=None, ge=0, le=86400, allow_inf_nan=False)

    return Start, Answer


def _token_check(token: str | None) -> Callable[..., None]:
    """The dependency every route runs: with a token, a request without it (query or header) is 403."""
    from fastapi import HTTPException, Request

    def require_token(request: Request) -> None:
        if token is None:
            return
        given = request.query_params.get("token") or request.headers.get(TOKEN_HEADER) or ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(403, "this page needs the token of its address (?token=...)")

    return require_token


def _malformed(request, error):
    """400 naming the first wrong field and what is wrong, without the value sent (it may be huge)."""
    from fastapi.responses import JSONResponse

    first = error.errors()[0]
    loc = () if first.get("type") == "json_invalid" else first.get("loc", ())  # its loc is a byte offset
    where = ".".join(str(part) for part in loc if part != "body") or "body"
    return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid')}"}, status_code=400)


class _StudyApi:
    """What the routes share: the study's database, its description, and the answers they give from it."""

    def __init__(self, store: AnnotationStore):
        self.store = store
        self.identity, self.description = store.value("identity"), store.value("description")

    def summary(self) -> dict[str, Any]:
        return {
            "title": self.description["title"],
            "task": self.description["task"],
            "split": self.description["split"],
            "n": self.identity["n"],
            "intro": self.identity["intro"],
            "max_cells": MAX_CELLS,
            "cell_names": list(CELL_NAMES),
        }

    def annotator_of(self, name: str) -> int:
        from fastapi import HTTPException

        try:
            return self.store.annotator(name)
        except UnknownAnnotator as error:
            raise HTTPException(404, str(error)) from None

    def state(self, number: int, name: str) -> dict[str, Any]:
        """Where an annotator stands: their progress and the next item as the page shows it."""
        progress = self.store.progress(number)
        upcoming = progress.pop("next")
        item = None
        if upcoming is not None:
            row = self.store.item(upcoming)
            item = {
                "id": upcoming,
                "practice": row["role"] == "intro",
                "image": f"/api/images/{upcoming}",
                **shown(row["text"], row["metadata"]),
            }
        return {"annotator": name, **progress, "finished": upcoming is None, "item": item}

    def item(self, item: int) -> Any:
        """The item's row; 404 when the study has no such item."""
        from fastapi import HTTPException

        row = self.store.item(item)
        if row is None:
            raise HTTPException(404, f"no item {item} in this study")
        return row

    def record(self, number: int, body: Any, row: Any) -> dict[str, Any]:
        """Store one answer (checked against its item) and say what comes next; each refusal its own status."""
        from fastapi import HTTPException

        if len(set(body.cells)) != len(body.cells):
            raise HTTPException(400, "cells: each cell at most once")
        if body.cells and not shown(row["text"], row["metadata"])["claims_cell"]:
            raise HTTPException(400, f"cells: item {body.item} claims no cell: no cells to rank")
        try:
            stored = self.store.record(number, body.item, body.answer, body.cells, body.incorrect, body.seconds)
        except (sqlite3.OperationalError, OSError) as error:
            if not is_disk_full(error):
                raise
            # the answer's transaction was rolled back: nothing of it is stored, the page keeps it to send again
            raise HTTPException(503, "the server's disk is full: the answer was not stored; send it again") from None
        except NotAssigned as error:
            raise HTTPException(404, str(error)) from None
        except NotNext as error:
            raise HTTPException(409, {"message": str(error), "state": self.state(number, body.annotator)}) from None
        if not stored:
            raise HTTPException(
                409,
                {
                    "message": f"item {body.item} was already answered by {body.annotator}",
                    "state": self.state(number, body.annotator),
                },
            )
        feedback = (
            {"practice": True, "answer": body.answer, "label": bool(row["label"])} if row["role"] == "intro" else None
        )
        return {"stored": True, "feedback": feedback, "state": self.state(number, body.annotator)}


def _add_page_routes(app, api: _StudyApi) -> None:
    """GET / (the page) and GET /api/study."""
    from fastapi.responses import HTMLResponse

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse(page_html(), headers=PAGE_HEADERS)

    @app.get("/api/study")
    def study() -> dict[str, Any]:
        return api.summary()


def _add_annotator_routes(app, api: _StudyApi, start_body: type, answer_body: type) -> None:
    """POST /api/annotators, GET /api/state, POST /api/answers: an annotator's way through the study."""
    from fastapi import HTTPException, Query

    @app.post("/api/annotators")
    def start(body: start_body) -> dict[str, Any]:
        try:
            number = api.store.register(body.name)
        except StudyFull as error:
            raise HTTPException(409, str(error)) from None
        return api.state(number, body.name)

    @app.get("/api/state")
    def current(annotator: Annotated[str, Query(min_length=1, max_length=NAME_LENGTH)]) -> dict[str, Any]:
        name = annotator.strip()
        return api.state(api.annotator_of(name), name)

    @app.post("/api/answers")
    def answer(body: answer_body) -> dict[str, Any]:
        number = api.annotator_of(body.annotator)
        return api.record(number, body, api.item(body.item))


def _add_image_route(app, api: _StudyApi) -> None:
    """GET /api/images/{item}: found by item number in the database, never by a path from the browser."""
    from fastapi.responses import FileResponse

    @app.get("/api/images/{item}")
    def image(item: int) -> FileResponse:
        return FileResponse(api.item(item)["image"], headers={"Cache-Control": "private, max-age=3600"})


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 before it is read whole (by its
    Content-Length, or as it arrives when it has none), and never echoed back."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.limit:
                return await _too_large(send, self.limit)
            return await self.app(scope, receive, send)
        # no length given (chunked): read the body up to the limit, then hand the application what was read
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            seen += len(message.get("body", b""))
            if seen > self.limit:
                return await _too_large(send, self.limit)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


async def _too_large(send, limit: int) -> None:
    body = f'{{"detail": "the request body is over {limit} bytes"}}'.encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def is_disk_full(error: BaseException) -> bool:
    """SQLite's SQLITE_FULL ("database or disk is full") or the system's ENOSPC / EDQUOT."""
    import errno

    if isinstance(error, sqlite3.OperationalError):
        return getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(error)
    return getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT)


def page_address(host: str, port: int, token: str | None) -> str:
    shown_host = f"[{host}]" if ":" in host else host
    return f"http://{shown_host}:{port}/" + (f"?token={token}" if token else "")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_reachable(host: str, token: str | None) -> None:
    """Refuse to serve on an address other machines can reach without a token: anyone there could answer (or
    read the study's images) in the annotators' names."""
    if not is_loopback(host) and token is None:
        raise ProbingError(f"--host {host}: reachable from other machines; give --token SECRET (or serve on 127.0.0.1)")


def check_port_free(host: str, port: int) -> None:
    """One line instead of uvicorn's exit when the address is taken (a race with another program stays
    possible; uvicorn then reports it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ProbingError(f"--port {port}: cannot listen on {host}:{port} ({error.strerror})") from None


def serve(store: AnnotationStore, host: str, port: int, token: str | None, say: Callable[[str], None]) -> None:
    """Serve the page until interrupted (Ctrl-C or SIGTERM end it cleanly; answers are already committed)."""
    import uvicorn

    check_reachable(host, token)
    check_port_free(host, port)
    say(f"annotation page: {page_address(host, port, token)}")
    config = uvicorn.Config(create_app(store, token), host=host, port=port, log_level="warning", access_log=False)
    uvicorn.Server(config).run()
