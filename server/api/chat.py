"""/v1/chat/completions (+ SSE streaming) and /v1/completions: the cheap checks, then one
shared request lifecycle (lifecycle.py) with the endpoint's renderer (render.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from .body import OffLoopJSONRoute
from .errors import APIError
from .lifecycle import serve
from .lifecycle import sse as _sse  # noqa: F401  (the SSE framing's old home, kept for importers)
from .prompts import sampling_params
from .protocol import ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse
from .render import ChatRenderer, CompletionRenderer
from .state import ServerState

router = APIRouter(route_class=OffLoopJSONRoute)
_STREAMED = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks when stream=true"}
}


def get_state(request: Request) -> ServerState:
    return request.app.state.grace


def check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.config.model_name:
        raise APIError(
            404,
            f"The model `{model}` does not exist. This server serves `{state.config.model_name}`.",
            param="model",
            code="model_not_found",
        )


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_STREAMED)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state = get_state(request)
    check_model(state, body.model)
    params = sampling_params(state, body)  # cheap checks first, before any image work
    return await serve(request, ChatRenderer(state, body, params), body.stream)


@router.post("/v1/completions", response_model=CompletionResponse, responses=_STREAMED)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    state = get_state(request)
    check_model(state, body.model)
    params = sampling_params(state, body)
    return await serve(request, CompletionRenderer(state, body, params), body.stream)
