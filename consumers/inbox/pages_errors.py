"""The inbox's error pages: one plain page (the status, a title, what to do; nothing about the
data), the not-found and forbidden pages the other pages answer with, and the handlers the app
installs for HTTP errors and unhandled exceptions.

Apart so every page refuses the same way: another team's referral and an unknown id get the
same 404, a forged form the same 403.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from referral_broker.consumers.inbox.auth import SignedIn
from referral_broker.consumers.inbox.rendering import render
from referral_broker.structured_log import get_logger

log = get_logger(__name__)


def plain_page(
    request: Request,
    status_code: int,
    title: str,
    *paragraphs: str,
    signed_in: SignedIn | None = None,
    link: dict[str, str] | None = None,
) -> HTMLResponse:
    """A plain error page: the status, a title, what to do; nothing about the data."""
    return render(
        request,
        "error.html",
        status_code=status_code,
        signed_in=signed_in,
        title=title,
        paragraphs=paragraphs,
        link=link,
    )


def not_found(request: Request, signed_in: SignedIn | None) -> HTMLResponse:
    return plain_page(
        request,
        404,
        "Page not found",
        "If you typed the web address, check it is correct. If you followed a link to a referral, "
        "it may belong to another team’s inbox.",
        signed_in=signed_in,
        link={"href": "/inbox", "text": "Go to your team’s referrals"},
    )


def forbidden(request: Request, signed_in: SignedIn | None) -> HTMLResponse:
    return plain_page(
        request,
        403,
        "This form has expired or was not sent from the inbox",
        "Nothing was changed. Go back to the page, reload it and try again.",
        signed_in=signed_in,
        link={"href": "/inbox", "text": "Go to your team’s referrals"},
    )


async def http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status == 404:
        return not_found(request, None)
    if status == 405:
        return plain_page(request, 405, "That is not how this page is used", "Go back and try again.")
    return plain_page(request, status, "Sorry, there is a problem with the service", "Try again later.")


async def server_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error", path=request.url.path, error=type(exc).__name__)
    return plain_page(
        request,
        500,
        "Sorry, there is a problem with the service",
        "Try again later. Nothing you were doing has been lost.",
    )
