"""Matching names as people type them: without case, accents, punctuation or word order."""

from __future__ import annotations

import unicodedata


def name_words(name: str) -> set[str]:
    """The words of a name, without case or accents: "MARTIN Jeanne-Élise" -> {martin, jeanne, elise}."""
    plain = "".join(ch for ch in unicodedata.normalize("NFKD", name) if not unicodedata.combining(ch)).casefold()
    return set("".join(ch if ch.isalnum() else " " for ch in plain).split())
