"""Language codes in route paths: any known code, normalised, or a 404 naming what exists."""

from collections.abc import Collection

from fastapi import HTTPException

from lingosteer.languages import UnknownLanguageError, normalize_code


def language_or_404(code: str, available: Collection[str], what: str) -> str:
    """The FLORES-200 code for `code` if it is among `available` (e.g. "loaded interventions")."""
    try:
        language = normalize_code(code)
    except UnknownLanguageError as error:
        raise HTTPException(404, str(error)) from None
    if language not in available:
        raise HTTPException(404, f"{language} is not among the {what}: {', '.join(sorted(available)) or 'none'}")
    return language
