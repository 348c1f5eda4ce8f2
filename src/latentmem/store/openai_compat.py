"""OpenAI-compatible chat completions over a tenant's memories, so existing OpenAI clients work.

    POST /v1/chat/completions    {model, messages, max_tokens | max_completion_tokens, temperature, top_p,
                                  stop, seed, stream, stream_options.include_usage, user}
    GET  /v1/models, /v1/models/{id}

The memory the answer reads: the ``X-Memory`` header when sent, else the ``user`` field (a
memory name of the caller's tenant; neither: 400). The API key is the service's own
(``Authorization: Bearer <key>``, what OpenAI clients send as ``api_key``). The server has one
model: ``model`` is required, as OpenAI clients always send it, and echoed back whatever it says.

Prompt: a conversation of one user message is asked as ``/generate`` asks a prompt (the model's
default form, the one the shipped weights read best); a longer one (system messages, earlier
turns) goes through the tokenizer's chat template. ``chat`` (an extension) forces either for a
single message. Omitted sampling fields take the service's defaults (greedy, 64 new tokens,
the model's stop strings and loop guard), not OpenAI's (temperature 1). The loop guard's
``finish_reason`` "repetition" is reported as "stop" (OpenAI clients know stop and length).

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with 400 for
invalid requests (never 422), 401, 404 (memory), 413; the OpenAI client raises them as its
``BadRequestError``, ``AuthenticationError``, ``NotFoundError``. A failure after streaming
started is a ``data: {"error": ...}`` chunk. Fields that would change the answer's meaning and
that this server cannot honour (``n`` > 1, tools, logprobs, penalties, JSON response formats)
are refused rather than ignored; other unknown fields are ignored, as new clients send new ones.
"""

import asyncio
import json
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Path
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .schemas import StreamDone, Text
from .store import check_name


# ---------------------------------------------------------------------------------------------
# Bodies (the subset of OpenAI's that applies)
# ---------------------------------------------------------------------------------------------
class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"] = Field(description="only text parts")
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256, description="echoed back; the server has one model (GET /v1/models)")
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(None, ge=1, description="new tokens at most (default 64, at most the server's --max-new-tokens)")
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens (wins when both are sent)")
    temperature: float | None = Field(None, ge=0, le=2, description="default 0: greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    stop: Text | list[Text] | None = Field(None, description="up to 16 stop strings")
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="the memory to read when no X-Memory header is sent")
    chat: bool | None = Field(None, description="extension: true/false forces the chat template / the plain form for a single user message")
    n: int | None = Field(None, ge=1, le=1, description="1 only")
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def supported(self):
        if any(v not in (None, 0, 0.0) for v in (self.presence_penalty, self.frequency_penalty)):
            raise ValueError("presence_penalty and frequency_penalty are not supported (send 0 or omit them)")
        if self.logprobs:
            raise ValueError("logprobs are not supported")
        if self.tools or self.functions:
            raise ValueError("tools and functions are not supported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("only response_format {\"type\": \"text\"} is supported")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 16 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop: at most 16 strings of 1-256 characters")
        if not any(m.role == "user" for m in self.messages):
            raise ValueError("messages: at least one user message is needed")
        return self

    def stops(self) -> list[str] | None:
        return [self.stop] if isinstance(self.stop, str) else self.stop

    def prompt(self) -> str | list[dict]:
        """A single user message as a plain prompt (unless chat=True), else the conversation."""
        if len(self.messages) == 1 and self.messages[0].role == "user":
            return self.messages[0].text()
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str = Field(description="the served model's id (its weights and memory shape)")
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One ``data:`` line of a streamed answer (then ``data: [DONE]``)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class OpenAIErrorBody(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error or server_error")
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorBody


OPENAI_ERRORS = {
    400: {"model": OpenAIError, "description": "invalid request (a field, no memory chosen, an invalid memory name, a body that is not JSON)"},
    401: {"model": OpenAIError, "description": "missing, unknown or revoked API key"},
    404: {"model": OpenAIError, "description": "no such memory for this tenant (or no such model)"},
    413: {"model": OpenAIError, "description": "request body over the server's limit"},
    "4XX": {"model": OpenAIError, "description": "every client error has this shape"},
}
STREAM_200 = {200: {"description": "the completion (JSON), or with stream: true server-sent events, one ChatCompletionChunk per `data:` line, then `data: [DONE]`",
                    "content": {"text/event-stream": {"schema": {"$ref": "#/components/schemas/ChatCompletionChunk"}}}}}


# ---------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------
def openai_routes(svc) -> APIRouter:
    """``svc``: the app's ``Service`` (store, settings, batcher, the tenant dependency)."""
    r, store, tenant = APIRouter(prefix="/v1", tags=["openai"]), svc.store, svc.tenant
    started = int(time.time())

    def model_card() -> dict:
        return {"id": store.lm.name, "created": started, "owned_by": "latentmem"}

    @r.get("/models", response_model=ModelList, responses={k: OPENAI_ERRORS[k] for k in (401, "4XX")})
    def list_models(t: str = Depends(tenant)):
        """The one model this server runs."""
        return {"data": [model_card()]}

    @r.get("/models/{model_id}", response_model=Model, responses={k: OPENAI_ERRORS[k] for k in (401, 404, "4XX")})
    def get_model(model_id: str = Path(), t: str = Depends(tenant)):
        if model_id != store.lm.name:
            raise HTTPException(404, f"no model {model_id!r}: this server runs {store.lm.name!r}")
        return model_card()

    @r.post("/chat/completions", response_model=ChatCompletion, responses={**STREAM_200, **OPENAI_ERRORS})
    async def chat_completions(req: ChatCompletionRequest, t: str = Depends(tenant),
                               x_memory: str | None = Header(None, alias="X-Memory", description="the memory to read (wins over user)")):
        """An answer in OpenAI's format from the memory named by X-Memory or else user."""
        name = x_memory if x_memory is not None else req.user
        if not name:
            raise HTTPException(400, "choose the memory to read: send the header X-Memory: NAME or the field user: NAME")
        try:
            check_name(name)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        memory = await asyncio.to_thread(store.memory, name, tenant=t)  # 404 in OpenAI's shape (path-based)
        limit = svc.settings.max_new_tokens
        max_new = req.max_completion_tokens or req.max_tokens or min(64, limit)
        if max_new > limit:
            raise HTTPException(400, f"max_tokens: at most {limit} on this server (--max-new-tokens)")
        sampling = {"max_new_tokens": max_new, "temperature": req.temperature or 0.0, "top_p": req.top_p or 1.0}
        sampling |= {k: v for k, v in (("seed", req.seed), ("stop", req.stops()), ("chat", req.chat)) if v is not None}
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": req.model, "system_fingerprint": store.lm.model_id}
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            items = await svc.start_stream(memory, req.prompt(), sampling)
            return StreamingResponse(_chunks(items, head, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        g = await svc.generate(memory, req.prompt(), sampling)
        n = len(g.token_ids)
        return {**head, "choices": [{"index": 0, "message": {"content": g.text}, "finish_reason": openai_finish(g.finish_reason)}],
                "usage": {"prompt_tokens": g.prompt_tokens, "completion_tokens": n, "total_tokens": g.prompt_tokens + n}}

    return r


def openai_finish(reason: str) -> str:
    """OpenAI clients know stop / length: the loop guard's "repetition" ends the answer like a stop."""
    return "length" if reason == "length" else "stop"


def _chunks(items, head: dict, include_usage: bool):
    """The answer as OpenAI's stream: a role chunk, content chunks, a finish chunk, the usage
    chunk when asked (choices empty), then [DONE]; an error after the start is an error chunk."""
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict, finish=None) -> str:
        body = {**head, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    try:
        done = None
        for item in items:
            if isinstance(item, StreamDone):
                done = item
            elif item:
                yield chunk({"content": item})
        yield chunk({}, openai_finish(done.finish_reason))
        if include_usage:
            usage = {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens, "total_tokens": done.prompt_tokens + done.completion_tokens}
            yield f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': [], 'usage': usage})}\n\n"
    except Exception as e:
        from .app import status_of

        status = status_of(e)
        kind = "server_error" if status >= 500 else "invalid_request_error"
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': kind, 'param': None, 'code': None}})}\n\n"
    yield "data: [DONE]\n\n"
