"""Phrases of a prompt: the user's own, checked against the prompt, or a phrase extractor's.

Phrase extractors are plugins (``host.phrase_extractor(name)``); what to do with phrases a user
wrote explicitly (keep them in order, once each, and refuse one that is not in the prompt) is
the same whichever extractor is configured, so it lives here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from t2ialign.core.errors import InputError

if TYPE_CHECKING:
    from t2ialign.core.protocols import PhraseExtractor


def dedupe_phrases(phrases: Iterable[str]) -> list[str]:
    """``phrases`` in their order, each once."""
    seen: set[str] = set()
    out = []
    for p in phrases:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def resolve_phrases(prompt: str, explicit: Iterable[str] | None, extractor: PhraseExtractor) -> list[str]:
    """The phrases to use for ``prompt``: the user's (checked to occur in it) or the extractor's."""
    if explicit:
        phrases = [p.strip() for p in explicit if isinstance(p, str) and p.strip()]
        missing = [p for p in phrases if p not in prompt]
        if missing:
            raise InputError(f"phrases {missing} do not occur in the prompt '{prompt}'",
                             where="phrases", fix="write each phrase exactly as it appears in the prompt")
        return dedupe_phrases(phrases)
    return extractor(prompt)


__all__ = ["dedupe_phrases", "resolve_phrases"]
