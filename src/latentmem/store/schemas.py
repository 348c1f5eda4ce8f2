"""The service's request and response bodies (pydantic), and the error responses each route declares.

Requests refuse unknown fields (``Strict``); responses are the typed views the OpenAPI document
shows (a route returns a dict and FastAPI validates it against these, so the document cannot
drift from what is sent). The OpenAI-compatible bodies live in ``openai_compat.py``.
"""

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, model_validator

from .store import FORGET_MODES, NAME_RE

NAME_PATTERN = f"^{NAME_RE.pattern}$"
# why an answer ended: "stop" (end of sequence or a stop string), "length" (max_new_tokens),
# "repetition" (the loop guard: the newest repeat_ngram tokens occurred repeat_limit times)
FinishReason = Literal["stop", "length", "repetition"]


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------
def utf8_text(s: str) -> str:
    """A JSON string may hold a lone surrogate ("\\ud800"), which no tokenizer encodes: refused
    here (422 naming where it is) instead of failing inside the model (issue 17)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text is not valid Unicode: a lone surrogate {s[e.start]!r} at character {e.start}; send UTF-8 text") from None
    return s


Text = Annotated[str, AfterValidator(utf8_text)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateMemory(Strict):
    name: str = Field(pattern=NAME_PATTERN, description="1-64 of [A-Za-z0-9_.-], not starting with '.' or '-'")
    seed: int | None = Field(None, ge=0, lt=2**63, description="seed of the memory's generator (random when omitted)")


class InjectRequest(Strict):
    text: Text | None = Field(None, min_length=1, description="one text (or use texts)")
    texts: list[Text] | None = Field(None, min_length=1, description="several texts, injected in order, committed together")
    source: Text = Field("", max_length=256, description="free label kept in the ledger (e.g. 'chat', 'crm')")
    store_text: bool = Field(True, description="false: the ledger keeps only hash and token count (no replay across it)")
    allow_short: bool = Field(False, description="accept a text under the design's minimum token count")

    @model_validator(mode="after")
    def one_of(self):
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' or 'texts'")
        if self.texts is not None and any(not t for t in self.texts):
            raise ValueError("texts must be non-empty strings")
        return self


class GenerateRequest(Strict):
    prompt: Text = Field(min_length=1, max_length=100_000, description="at most the server's max_prompt_tokens tokens, max_new_tokens included (413)")
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0, le=10, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=100_000, description="0: off")
    seed: int | None = Field(None, ge=0, lt=2**63, description="seeds sampling (never batched with other requests)")
    stop: list[Annotated[str, Field(min_length=1, max_length=256), AfterValidator(utf8_text)]] | None = Field(
        None, max_length=16, description="stop strings, cut off the answer (omitted: the model's default)")
    chat: bool | None = Field(None, description="true: the tokenizer's chat template; false: the plain prompt (omitted: the model's default)")
    repeat_ngram: int | None = Field(None, ge=1, le=256, description="loop guard: n-gram length watched (omitted: the model's default)")
    repeat_limit: int | None = Field(None, ge=0, le=10_000, description="loop guard: stop when the newest n-gram occurred this often; 0: off (omitted: the model's default)")
    stream: bool = Field(False, description="server-sent events: 'data: {\"text\": ...}' per piece, then 'event: done' with the counts")

    @model_validator(mode="after")
    def guard(self):
        if self.repeat_limit == 1:
            raise ValueError("repeat_limit must be 0 (off) or >= 2")
        return self

    def sampling(self) -> dict:
        """Keyword arguments of ``MemoryModel.generate``; stop, chat and the loop guard only when
        given, so the model's own defaults apply otherwise (one default for the CLI, Python and HTTP)."""
        return self.model_dump(exclude={"prompt", "stream"}, exclude_none=True)


class SnapshotRequest(Strict):
    label: str = Field(pattern=NAME_PATTERN)


class ForgetRequest(Strict):
    injection_id: int = Field(ge=1, lt=2**63)
    mode: str = Field("fast", pattern="^(" + "|".join(FORGET_MODES) + ")$", description="fast: the design's own forget; exact: as if never injected")


def bounded_bodies(max_texts: int, max_new_tokens: int) -> tuple[type[InjectRequest], type[GenerateRequest]]:
    """InjectRequest with at most ``max_texts`` texts, GenerateRequest with at most
    ``max_new_tokens`` (subclasses made per app: apps keep their own bounds)."""
    texts = Field(None, min_length=1, max_length=max_texts, description=InjectRequest.model_fields["texts"].description)
    return (
        create_model("InjectRequest", __base__=InjectRequest, texts=(list[Text] | None, texts)),
        create_model("GenerateRequest", __base__=GenerateRequest, max_new_tokens=(int, Field(64, ge=1, le=max_new_tokens))),
    )


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------
class Health(BaseModel):
    status: Literal["ok"]
    model: str
    model_id: str
    design: str


class MemoryFacts(BaseModel):
    """A memory's facts (the caller's own: no tenant)."""

    name: str
    seed: int
    model_id: str
    created_at: float = Field(description="Unix time")
    live_injections: int
    update_count: int = Field(description="writes applied to the live state")
    snapshots: int
    base_seq: int = Field(description="replay starts at this ledger seq ...")
    base_reason: str = Field(description="... for this reason")


class MemoryList(BaseModel):
    memories: list[MemoryFacts]


class Injection(BaseModel):
    """A ledger row (inject rows: id, source, hash, token count, status)."""

    seq: int
    kind: Literal["create", "inject", "snapshot", "rollback", "forget", "import"]
    injection_id: int | None
    created_at: float
    source: str | None = None
    sha256: str | None = Field(None, description="of the UTF-8 text; kept after forget")
    num_tokens: int | None = None
    num_chunks: int | None = None
    allow_short: bool | None = None
    status: str = Field("done", description="inject rows: live | rolled_back | forgotten; others: done")
    deleted_at: float | None = Field(None, description="when forget erased the text")
    detail: str | None = None


class InjectResponse(BaseModel):
    injections: list[Injection]


class LedgerEntry(Injection):
    text: str | None = Field(None, description="only with include_text=true; null when not stored or forgotten")


class Ledger(BaseModel):
    entries: list[LedgerEntry]


class GenerateResponse(BaseModel):
    text: str
    finish_reason: FinishReason = Field(description="stop: end of sequence or a stop string; length: max_new_tokens reached; repetition: the loop guard")
    prompt_tokens: int
    completion_tokens: int


class StreamDone(BaseModel):
    """The data of the stream's final ``event: done``."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


class Snapshot(BaseModel):
    label: str
    created_at: float
    seq: int
    injections: list[int] = Field(description="injection ids live in this version")


class SnapshotList(BaseModel):
    snapshots: list[Snapshot]


class ForgetReport(BaseModel):
    injection_id: int
    mode: Literal["fast", "exact"]
    slots_reset: int = Field(description="fast: slots dropped from the live pool; exact: slots that held it before")
    replayed: int = Field(description="exact: injections re-run")
    snapshots_deleted: list[str]
    was_live: bool


class LayerDiff(BaseModel):
    layer: int
    added: int
    removed: int


class Diff(BaseModel):
    """What the design's ``diff`` reports (MemoryLLM: slots per layer); other designs may add keys."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    from_: str = Field(alias="from", serialization_alias="from")
    to: str
    changed_slots: int
    layers: list[LayerDiff] | None = None
    added_by_injection: dict[int, int] | None = Field(None, description="injection id -> slots added (-1: reset or never written)")
    removed_by_injection: dict[int, int] | None = None


class VerifyReport(BaseModel):
    ok: bool
    replayed: int
    base_seq: int
    base_reason: str
    message: str
    mismatches: list[str]


# ---------------------------------------------------------------------------------------------
# Errors, and what each route declares
# ---------------------------------------------------------------------------------------------
class Error(BaseModel):
    detail: str = Field(description="what went wrong, in one sentence")


class ValidationIssue(BaseModel):
    model_config = ConfigDict(extra="allow")

    loc: list[str | int]
    msg: str
    type: str


class ValidationError(BaseModel):
    detail: str | list[ValidationIssue] = Field(description="a message, or one item per invalid field")


ERROR_TEXT = {
    400: "the request cannot be carried out (e.g. a file that is not a memory export)",
    401: "missing, unknown or revoked API key",
    403: "the tenant's quota of memories is used up",
    404: "no such memory, snapshot or injection for this tenant",
    409: "exists already, or exact forget is impossible",
    413: "request body over the server's limit, or a prompt or injection over its token limit",
    422: "invalid body, parameter or name; body that is not JSON; text too short for a self-update",
}


def errors(*codes: int, model: type[BaseModel] = Error) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route that can answer these statuses."""
    return {c: {"model": ValidationError if c == 422 and model is Error else model, "description": ERROR_TEXT[c]} for c in codes}


def binary(media_type: str, description: str) -> dict[str, Any]:
    """An OpenAPI content entry for a binary body."""
    return {"description": description, "content": {media_type: {"schema": {"type": "string", "format": "binary"}}}}
