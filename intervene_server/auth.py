"""Bearer-token guard for the admin routes, and their structured audit log.

No `Authorization: Bearer` header -> 401, a wrong token -> 403; tokens are compared
in constant time. Every admin action is logged as one JSON line on the
`lingosteer.admin` logger.
"""

import hmac
import json
import logging
import stat
import sys
import time
from pathlib import Path

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

audit_logger = logging.getLogger("lingosteer.admin")
_bearer = HTTPBearer(auto_error=False, description="the token in the server's --admin-token-file")


def read_token_file(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"admin token file {path} not found")
    token = path.read_text().strip()
    if len(token) < 16:
        raise ValueError(f"admin token in {path} is too short (use at least 16 characters)")
    if path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
        logging.getLogger("lingosteer.server").warning("admin token file %s is readable by other users", path)
    return token


def require_token(token: str):
    """A FastAPI dependency accepting exactly `token`; returns a short id of the caller for logs."""
    expected = token.encode()

    async def check(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> str:
        if credentials is None or credentials.scheme.lower() != "bearer":
            audit("denied", request, reason="missing bearer token")
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(credentials.credentials.encode(), expected):
            audit("denied", request, reason="wrong token")
            raise HTTPException(403, "invalid admin token")
        return request.client.host if request.client else "unknown"

    return check


def audit(action: str, request: Request, **fields) -> None:
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "action": action,
        "method": request.method,
        "path": request.url.path,
        "client": request.client.host if request.client else None,
        **fields,
    }
    audit_logger.info(json.dumps(record, sort_keys=True))


def configure_audit_log() -> None:
    """JSON lines to stderr, whatever vLLM does to the root logger."""
    if not audit_logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        audit_logger.addHandler(handler)
        audit_logger.setLevel(logging.INFO)
        audit_logger.propagate = False
