"""The Activations page: one static HTML page with plain JavaScript and CSS (no build step).

The page and its two assets hold no data; every connector it shows comes from the token-guarded
/v1 routes, called by the page's script with the bearer token the person typed in.
"""

from __future__ import annotations

from importlib.resources import files

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

ASSETS = {
    "/activations": ("activations.html", "text/html; charset=utf-8"),
    "/activations/app.js": ("activations.js", "text/javascript; charset=utf-8"),
    "/activations/app.css": ("activations.css", "text/css; charset=utf-8"),
}
# The paths a browser loads by navigation or <script>/<link>: it cannot add a bearer header
# to those requests, so they are the only ones served without the token.
PUBLIC_PATHS = frozenset(ASSETS)

# Same-origin only: the page talks to this API and nothing else; no inline script or style.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _asset(path: str) -> Route:
    filename, content_type = ASSETS[path]
    body = files(__package__).joinpath(filename).read_bytes()

    async def serve(request: Request) -> Response:
        return Response(body, media_type=content_type, headers=SECURITY_HEADERS)

    return Route(path, serve, methods=["GET"], include_in_schema=False)


def routes() -> list[Route]:
    return [_asset(path) for path in ASSETS]
