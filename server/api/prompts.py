"""Request -> model input: chat messages (with images) or a raw prompt -> PromptInputs, and the
request's sampling fields -> SamplingParams (model defaults where the request is silent).

Image work (base64 decode, pixel decode, resize, patchify) and long text run in low-priority
worker threads (background.py), never on the event loop; http(s) images are fetched first (media.py). Every refusal is a 400 whose
`param` points at the offending field.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from typing import Any

from server.engine.sampling_params import MAX_CHOICES, MAX_LOGIT_BIAS_VALUE, SamplingParams
from server.engine.structured import StructuredOutputError
from server.model.images import ImageError, ProcessedImage
from server.model.processor import LONG_TEXT_CHARS, ImageCountError, PromptError, PromptInputs

from .background import run_image_work, run_text_work
from .constraints import check_tools, structured_output
from .errors import APIError, bad_request
from .media import check_allowed, fetch_image, url_scheme
from .protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from .state import ServerState

_DEFAULTABLE = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
_FALLBACK = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


# -- messages -------------------------------------------------------------------------------


def normalize_messages(messages: list[ChatMessage]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Messages in the shape the chat template expects (images as `{"type": "image"}`
    placeholders, as Processor.process_chat builds them; assistant `tool_calls` and `tool`
    results as Qwen's template reads them) and the image URLs with their param."""
    out: list[dict[str, Any]] = []
    images: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        content: Any
        if isinstance(m.content, list):
            content = []
            for j, part in enumerate(m.content):
                if part.type == "text":
                    content.append({"type": "text", "text": part.text})
                else:
                    assert part.image_url is not None
                    images.append((f"messages[{i}].content[{j}].image_url.url", part.image_url.url))
                    content.append({"type": "image"})
        else:
            content = m.content or ""
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_calls:
            msg["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
                for c in m.tool_calls
            ]  # fmt: skip
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out, images


async def chat_inputs(
    state: ServerState,
    messages: list[ChatMessage],
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
) -> PromptInputs:
    processor = state.processor
    normalized, sources = normalize_messages(messages)
    limit = state.config.max_images_per_request
    if len(sources) > limit:
        raise bad_request(
            f"too many images: {len(sources)} in this request, the limit is {limit}",
            "messages",
            "too_many_images",
        )
    for param, url in sources:  # refuse cheap-to-spot problems before any decoding work
        _check_source(state, param, url)
    num_chars = sum(_text_chars(m.content) for m in messages) + (len(json.dumps(tools)) if tools else 0)
    check_text_size(state, num_chars, "messages")
    images = await asyncio.gather(*(_load_image(state, param, url) for param, url in sources))

    def build() -> PromptInputs:
        extra = {"tools": tools} if tools else {}
        return processor.build_inputs(
            processor.render_chat(normalized, add_generation_prompt, **extra), list(images)
        )

    try:
        if num_chars < LONG_TEXT_CHARS:
            # Short chats inline (well under a millisecond): in a worker thread the template's
            # pure Python takes the GIL from the loop for a switch interval (5 ms) at a time.
            return build()
        return await run_text_work(build)  # long ones: template and tokenizer off the loop
    except ImageCountError as e:
        raise _image_outside_user_turns(messages, sources) or bad_request(str(e), "messages") from e
    except PromptError as e:
        raise bad_request(str(e), "messages") from e


def _image_outside_user_turns(messages: list[ChatMessage], sources: list[tuple[str, str]]) -> APIError | None:
    """Qwen's chat template reads images from user (and tool) turns and leaves the others'
    out: the placeholder count then falls short. Say which image, not the counts."""
    for param, _ in sources:
        role = messages[int(param[len("messages[") : param.index("]")])].role
        if role not in ("user", "tool"):
            return bad_request(
                f"an image in a {role} message: the chat template reads images from user and "
                "tool messages only; send it in a user message",
                param,
                "invalid_image",
            )
    return None


def _text_chars(content: str | list[Any] | None) -> int:
    if isinstance(content, str):
        return len(content)
    return sum(len(part.text or "") for part in content or [])


def check_text_size(state: ServerState, num_chars: int, param: str) -> None:
    """Refuse text that cannot fit the context before tokenizing it (tokenizing megabytes
    takes seconds): its fewest possible tokens already exceed max_model_len."""
    fewest, limit = state.processor.min_tokens(num_chars), state.max_model_len
    if fewest >= limit:
        raise APIError(
            400,
            f"the prompt has {num_chars} characters, at least {fewest} tokens, which leaves no room to "
            f"generate within the maximum context length of {limit} tokens",
            param=param,
            code="context_length_exceeded",
        )


async def tokenize_text(state: ServerState, text: str) -> list[int]:
    """Token ids of a raw prompt, tokenized off the event loop when it is long."""
    if len(text) < LONG_TEXT_CHARS:
        return state.processor.encode(text)
    return await run_text_work(state.processor.encode, text)


def _check_source(state: ServerState, param: str, url: str) -> None:
    scheme = url_scheme(url)
    try:
        if scheme in ("http", "https"):
            check_allowed(url, state.media)
        elif scheme != "data":
            raise ImageError(
                f"image URL scheme {scheme or '(none)'!r} is not allowed: send a data: URL"
                + (" or an http(s) URL on an allowed host" if state.media.allowed_domains else "")
            )
    except ImageError as e:
        raise bad_request(str(e), param, "invalid_image_url") from e


async def _load_image(state: ServerState, param: str, url: str) -> ProcessedImage:
    source: str | bytes = url
    if url_scheme(url) in ("http", "https"):
        assert state.http is not None
        try:
            source = await fetch_image(url, state.media, state.http)
        except ImageError as e:
            raise bad_request(str(e), param, "invalid_image_url") from e
    try:
        t0 = time.perf_counter()
        image = await run_image_work(state.processor.load, source)
        state.metrics.image_preprocess.observe(time.perf_counter() - t0)
        return image
    except (ImageError, PromptError) as e:
        raise bad_request(str(e), param, "invalid_image") from e


MAX_PROMPTS = 64  # prompts in one /v1/completions request (each is an engine request)


async def completion_inputs(state: ServerState, req: CompletionRequest) -> list[PromptInputs]:
    """The prompts of a completions request: a string, a list of token ids, or a list of
    either (one choice group per prompt, in order)."""
    prompt: Any = req.prompt
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompts = [prompt]
    else:
        prompts = prompt
    if not prompts:
        raise bad_request("prompt must not be empty", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise bad_request(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", "prompt")
    if len(prompts) * req.n > MAX_CHOICES:
        raise bad_request(
            f"n ({req.n}) x prompts ({len(prompts)}) is more than {MAX_CHOICES} choices in one request", "n"
        )
    for one in prompts:  # every cheap refusal before any tokenizing
        if not one:
            raise bad_request("prompt must not be empty", "prompt")
        if isinstance(one, list):
            check_token_ids(state, one, "prompt")
        else:
            check_text_size(state, len(one), "prompt")
    inputs = []
    for one in prompts:
        try:
            ids = one if isinstance(one, list) else await tokenize_text(state, one)
            inputs.append(
                replace(state.processor.process_prompt(ids), prompt=one if isinstance(one, str) else None)
            )
        except PromptError as e:
            raise bad_request(str(e), "prompt") from e
    return inputs


def check_token_ids(state: ServerState, ids: list[int], param: str) -> None:
    vocab = state.processor.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is out of range (vocabulary size {vocab})", param)


# -- sampling -------------------------------------------------------------------------------


def sampling_params(state: ServerState, req: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
    """Validate and convert the sampling fields (before any expensive input work); max_tokens
    is settled later by fit_to_context() once the prompt length is known."""
    defaults = state.processor.generation_defaults
    values = {}
    for name in _DEFAULTABLE:
        v = getattr(req, name)
        values[name] = v if v is not None else defaults.get(name, _FALLBACK[name])
    if isinstance(req, ChatCompletionRequest):
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs=true", "top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        max_tokens = req.max_tokens
        logprobs = req.logprobs
        if req.echo:
            raise bad_request("echo is not supported", "echo")
        if req.suffix:
            raise bad_request("suffix is not supported", "suffix")
    _refuse_unsupported(req)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    logit_bias = _logit_bias(state, req.logit_bias)
    if isinstance(req, ChatCompletionRequest):
        check_tools(req)
    structured, _ = structured_output(req)
    if req.stop_token_ids:
        check_token_ids(state, req.stop_token_ids, "stop_token_ids")
    if max_tokens is not None and req.min_tokens > max_tokens:
        raise bad_request("min_tokens must not exceed max_tokens", "min_tokens")
    try:
        return SamplingParams(
            n=req.n,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            stop=stop,
            stop_token_ids=list(req.stop_token_ids or []),
            seed=req.seed,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logprobs=logprobs,
            ignore_eos=req.ignore_eos,
            skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
            logit_bias=logit_bias,
            structured=structured,
            **values,
        )
    except ValueError as e:  # SamplingParams names the field first
        raise bad_request(str(e), str(e).split(" ", 1)[0]) from e


# Fields a caller sets expecting an effect this server cannot give: a 400, never silence.
_UNSUPPORTED = {
    "functions": "the deprecated 'functions' field is not supported; send 'tools'",
    "function_call": "the deprecated 'function_call' field is not supported; send 'tool_choice'",
    "audio": "audio output is not supported: this model writes text",
    "web_search_options": "web search is not available on this server",
    "prediction": "predicted outputs are not supported",
}


def _refuse_unsupported(req: ChatCompletionRequest | CompletionRequest) -> None:
    if isinstance(req, ChatCompletionRequest):
        for name, why in _UNSUPPORTED.items():
            if getattr(req, name) is not None:
                raise bad_request(why, name)
        if req.modalities is not None and set(req.modalities) - {"text"}:
            raise bad_request("only the 'text' output modality is supported", "modalities")
    elif req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of is not supported (send n to get several choices)", "best_of")


def _logit_bias(state: ServerState, bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's {"token id": bias} -> {id: bias}, every id in the vocabulary, |bias| <= 100."""
    if not bias:
        return None
    vocab, out = state.processor.vocab_size, {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()) or int(key) >= vocab:
            raise bad_request(f"logit_bias key {key[:32]!r} is not a token id (vocabulary size {vocab})",
                              "logit_bias")  # fmt: skip
        if not -MAX_LOGIT_BIAS_VALUE <= value <= MAX_LOGIT_BIAS_VALUE:
            raise bad_request(
                f"logit_bias values must be in [-100, 100] (got {value} for {key})", "logit_bias"
            )
        out[int(key)] = float(value)
    return out


async def check_structured_output(
    state: ServerState, params: SamplingParams, req: ChatCompletionRequest | CompletionRequest
) -> None:
    """Compile the request's grammar before admission, off the loop (cached by spec): one the
    grammar engine refuses is a 400 naming where it came from, and never reaches the engine."""
    if params.structured is None:
        return
    try:
        await run_text_work(state.grammars.check, params.structured)
    except StructuredOutputError as e:
        raise bad_request(f"cannot constrain the output to this: {e}", structured_output(req)[1],
                          "unsupported_structured_output") from e  # fmt: skip


def fit_to_context(state: ServerState, params: SamplingParams, num_prompt: int, prompt_param: str,
                   max_tokens_param: str) -> SamplingParams:  # fmt: skip
    """Refuse prompts that cannot fit; default max_tokens to the rest of the context (vLLM)."""
    limit = state.max_model_len
    if num_prompt >= limit:
        raise APIError(
            400,
            f"the prompt has {num_prompt} tokens, which leaves no room to generate within the maximum "
            f"context length of {limit} tokens",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if params.max_tokens is None:
        rest = params.max_output_tokens(num_prompt, limit)  # the rest of the context
        if params.min_tokens > rest:
            raise bad_request(f"min_tokens ({params.min_tokens}) does not fit in the context", "min_tokens")
        return replace(params, max_tokens=rest)
    if num_prompt + params.max_tokens > limit:
        raise APIError(
            400,
            f"prompt ({num_prompt} tokens) + max_tokens ({params.max_tokens}) exceeds the maximum context "
            f"length of {limit} tokens",
            param=max_tokens_param,
            code="context_length_exceeded",
        )
    return params
