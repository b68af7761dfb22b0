"""The directory protocol that nodes and bootstraps share (docs/bootstrap.md), without I/O.

What crosses the wire between a node and a bootstrap, and between bootstraps: the paths and
content types, the shapes of the answers (canonical msgpack maps), their limits, the checks a
reader applies to every descriptor it is handed, and the duplicate-identity flags of a search.
The aiohttp client is node/transport/directory.py; the server is bootstrap/. Both build and
read their messages here, so the two sides cannot drift apart.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Iterable

from . import wire
from .errors import CabinetError, RemoteProtocolError, UsageError
from .identity import Descriptor

MSGPACK = "application/msgpack"
DESCRIPTOR_TYPE = "application/x-cabinet-descriptor"
ANNOUNCE, NODES, SEARCH, SYNC = "/v1/announce", "/v1/nodes/", "/v1/search", "/v1/sync"
MAX_ANSWER = 2 << 20                  # what a client reads from a bootstrap at most
SEARCH_LIMIT = 50
MAX_QUERY_CHARS = 200
MAX_QUERY_WORDS = 8
SYNC_LIMIT = 500                      # default page size
SYNC_MAX_ITEMS = 1000
MAX_WAIT = 30                         # seconds a sync request may long-poll

SAME_RPPS = "same-rpps"               # another identity claims this RPPS number
SAME_NAME_CITY = "same-name-city"     # another identity claims this name in this city
CONFLICTS = (SAME_RPPS, SAME_NAME_CITY)


# --- text: what is indexed, searched and compared ---------------------------------------

_WORD = re.compile(r"[^\W_]+")
_LIGATURES = str.maketrans({"œ": "oe", "æ": "ae", "ø": "o", "ł": "l", "đ": "d", "ı": "i"})


def normalise(text: str) -> str:
    """'Saint-Étienne, CŒUR' -> 'saint etienne coeur': what is indexed and what is searched."""
    folded = unicodedata.normalize("NFKD", text.casefold())
    plain = "".join(ch for ch in folded if not unicodedata.combining(ch)).translate(_LIGATURES)
    return " ".join(_WORD.findall(plain.casefold()))


def query_words(query: str) -> list[str]:
    """The normalised words of a search query (plural specialty forms made singular), or UsageError
    if it is empty or too long."""
    if len(query) > MAX_QUERY_CHARS:
        raise UsageError(f"search query over {MAX_QUERY_CHARS} characters")
    words = [_singular(w) for w in normalise(query).split()]
    if not words:
        raise UsageError("empty search query: give a name, specialty, city or RPPS number")
    if len(words) > MAX_QUERY_WORDS:
        raise UsageError(f"search query over {MAX_QUERY_WORDS} words")
    return words


# Each group lists the usual French and English forms of one specialty (accents and case do
# not matter: they go through `normalise`). A descriptor whose specialty contains one form is
# indexed under all of them, so "cardiologue Lyon" finds a "Cardiologie" practice, and a query
# word that is a plural of a form ("cardiologues") is searched as the form.
SPECIALTIES: tuple[tuple[str, ...], ...] = (
    ("cardiologie", "cardiologue", "cardiology", "cardiologist"),
    ("médecine générale", "médecin généraliste", "généraliste", "general practice", "general practitioner",
     "family medicine", "gp"),
    ("pédiatrie", "pédiatre", "pediatrics", "paediatrics", "pediatrician", "paediatrician"),
    ("dermatologie", "dermatologue", "dermatology", "dermatologist"),
    ("gynécologie", "gynécologue", "gynecology", "gynaecology", "gynecologist", "obstétrique",
     "obstetrics"),
    ("psychiatrie", "psychiatre", "psychiatry", "psychiatrist"),
    ("neurologie", "neurologue", "neurology", "neurologist"),
    ("ophtalmologie", "ophtalmologue", "ophthalmology", "ophthalmologist"),
    ("oto-rhino-laryngologie", "orl", "otorhinolaryngology", "ent"),
    ("pneumologie", "pneumologue", "pulmonology", "pulmonologist", "respiratory medicine"),
    ("gastro-entérologie", "gastro-entérologue", "gastroenterology", "gastroenterologist"),
    ("endocrinologie", "endocrinologue", "endocrinology", "endocrinologist", "diabétologie"),
    ("rhumatologie", "rhumatologue", "rheumatology", "rheumatologist"),
    ("néphrologie", "néphrologue", "nephrology", "nephrologist"),
    ("urologie", "urologue", "urology", "urologist"),
    ("oncologie", "oncologue", "cancérologie", "oncology", "oncologist"),
    ("radiologie", "radiologue", "imagerie médicale", "radiology", "radiologist"),
    ("gériatrie", "gériatre", "geriatrics", "geriatrician"),
    ("anesthésie", "anesthésiste", "anesthésiologie", "anaesthesia", "anesthesiology", "anesthesiologist"),
    ("chirurgie", "chirurgien", "surgery", "surgeon"),
    ("kinésithérapie", "kinésithérapeute", "kiné", "physiotherapy", "physiotherapist"),
    ("sage-femme", "maïeutique", "midwife", "midwifery"),
)
_GROUPS = tuple(tuple(normalise(form) for form in group) for group in SPECIALTIES)
_SINGLE_FORMS = frozenset(form for group in _GROUPS for form in group if " " not in form)


def _contains(words: list[str], form: str) -> bool:
    want = form.split()
    return any(words[i:i + len(want)] == want for i in range(len(words) - len(want) + 1))


def specialty_terms(specialty: str) -> str:
    """The normalised specialty and every usual form of the specialties it names, for the index."""
    text = normalise(specialty)
    words = text.split()
    extra = [form for group in _GROUPS if any(_contains(words, f) for f in group) for form in group]
    return " ".join([text, *dict.fromkeys(f for f in extra if not _contains(words, f))]).strip()


def _singular(word: str) -> str:
    """'cardiologues' -> 'cardiologue' when the singular is a specialty form; other words unchanged."""
    if word.endswith(("s", "x")) and word[:-1] in _SINGLE_FORMS:
        return word[:-1]
    return word


# --- answers ---------------------------------------------------------------------------

def base_url(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"a bootstrap address starts with http:// or https:// (got {url[:60]!r})")
    return url.rstrip("/")


def error_body(message: str) -> dict[str, Any]:
    return {"error": message}


def error_reason(raw: bytes, status: int) -> str:
    """The one-line reason of a refusal, made printable (it comes from an untrusted server)."""
    try:
        answer = wire.unpack(raw, max_size=MAX_ANSWER, what="answer")
        reason = answer.get("error") if isinstance(answer, dict) else None
    except CabinetError:
        reason = None
    reason = reason if isinstance(reason, str) else f"HTTP {status}"
    return "".join(ch if ch.isprintable() else "?" for ch in reason[:200])


def decode_map(raw: bytes, what: str) -> dict[str, Any]:
    answer = wire.unpack(raw, max_size=MAX_ANSWER, what=what)
    if not isinstance(answer, dict):
        raise RemoteProtocolError(f"{what}: expected a map")
    return answer


def announce_answer(status: str, node_id: str, seq: int) -> dict[str, Any]:
    return {"status": status, "node_id": node_id, "seq": seq}


# --- descriptors as a reader checks them --------------------------------------------------

def verified(raw: bytes) -> Descriptor:
    """Descriptor.from_wire, with the odd malformed shape it lets through as TypeError made an error too."""
    try:
        return Descriptor.from_wire(raw)
    except TypeError:
        raise RemoteProtocolError("descriptor: malformed") from None


def check(d: Descriptor, *, now: int, node_id: str | None = None, min_seq: int = 0) -> Descriptor:
    """Refuse a verified descriptor that is not the one asked for, expired, or older than known."""
    if node_id is not None and d.node_id != node_id:
        raise RemoteProtocolError("the bootstrap answered with another node's descriptor")
    if d.expired(now) and not d.revoked:
        raise RemoteProtocolError(f"descriptor of {d.node_id} has expired")
    if d.seq < min_seq:
        raise RemoteProtocolError(f"descriptor of {d.node_id} is older (seq {d.seq}) than the one known ({min_seq})")
    return d


# --- search ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Found:
    """A verified search result, and the duplicate-identity flags raised about it (CONFLICTS)."""
    descriptor: Descriptor
    conflict: tuple[str, ...] = ()


def search_answer(items: list[bytes], conflicts: list[list[str]]) -> dict[str, Any]:
    """`conflicts[i]` flags `items[i]`; an answer without it (an older server) flags nothing."""
    return {"items": items, "conflicts": conflicts}


def _flags(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(sorted({f for f in value if f in CONFLICTS}))


def decode_search(raw: bytes, what: str, *, now: int) -> list[Found]:
    """Verified results, one per node (highest seq); descriptors that fail a check are dropped."""
    answer = decode_map(raw, what)
    items = answer.get("items")
    if not isinstance(items, list):
        raise RemoteProtocolError(f"{what}: expected a list of descriptors")
    flags = answer.get("conflicts")
    flags = flags if isinstance(flags, list) and len(flags) == len(items) else [[]] * len(items)
    found: list[Found] = []
    for item, flag in zip(items, flags):
        try:
            found.append(Found(check(verified(item), now=now), _flags(flag)))
        except CabinetError:
            continue
    return merge(found)


def merge(found: Iterable[Found]) -> list[Found]:
    """One result per node (the highest seq), with every flag raised about that node, plus the
    conflicts visible among the results themselves; sorted by name."""
    best: dict[str, Found] = {}
    flags: dict[str, set[str]] = {}
    for f in found:
        node_id = f.descriptor.node_id
        flags.setdefault(node_id, set()).update(f.conflict)
        if node_id not in best or best[node_id].descriptor.seq < f.descriptor.seq:
            best[node_id] = f
    for node_id, seen in conflicts_among(f.descriptor for f in best.values()).items():
        flags[node_id].update(seen)
    return sorted((Found(f.descriptor, tuple(sorted(flags[n]))) for n, f in best.items()),
                  key=lambda f: (f.descriptor.name.casefold(), f.descriptor.node_id))


def name_city_key(name: str, city: str) -> tuple[str, str] | None:
    """What 'the same name and city' compares (case, accents and punctuation ignored)."""
    key = (normalise(name), normalise(city))
    return key if key[0] else None


def conflicts_among(descriptors: Iterable[Descriptor]) -> dict[str, set[str]]:
    """For each node ID, which other identities among `descriptors` claim its RPPS or name and city."""
    by_rpps: dict[str, set[str]] = {}
    by_name: dict[tuple[str, str], set[str]] = {}
    for d in descriptors:
        if d.revoked:
            continue
        if d.rpps:
            by_rpps.setdefault(d.rpps, set()).add(d.node_id)
        if (key := name_city_key(d.name, d.city)) is not None:
            by_name.setdefault(key, set()).add(d.node_id)
    out: dict[str, set[str]] = {}
    for groups, flag in ((by_rpps, SAME_RPPS), (by_name, SAME_NAME_CITY)):
        for ids in groups.values():
            if len(ids) > 1:
                for node_id in ids:
                    out.setdefault(node_id, set()).add(flag)
    return out


# --- sync (anti-entropy between bootstraps) -------------------------------------------------

@dataclass(frozen=True, slots=True)
class SyncPage:
    db: bytes              # the peer's database ID: a new one means start again from 0
    items: list[bytes]     # signed descriptors, NOT verified here: the receiving store verifies each
    last: int
    more: bool

    def to_wire(self) -> dict[str, Any]:
        return {"db": self.db, "items": self.items, "last": self.last, "more": self.more}

    @classmethod
    def from_wire(cls, raw: bytes, what: str) -> "SyncPage":
        answer = decode_map(raw, what)
        items = wire.field(answer, "items", list, what=what)
        if not all(isinstance(i, bytes) for i in items):
            raise RemoteProtocolError(f"{what}: items must be signed descriptors")
        return cls(db=wire.field(answer, "db", bytes, what=what, size=16), items=items,
                   last=wire.field(answer, "last", int, what=what), more=bool(answer.get("more")))


def sync_params(since: int, limit: int = SYNC_LIMIT, wait: float = 0) -> dict[str, str]:
    return {"since": str(since), "limit": str(limit), "wait": str(int(wait))}
