"""Two more real clients use structured outputs and tools against the demo server on
127.0.0.1: langchain-openai (`with_structured_output`, `bind_tools`) and pydantic-ai
(`output_type`). The demo model is random: only the server's grammar makes these pass."""

from __future__ import annotations

import enum
import json

import pytest
from api_server import ServerProcess

pydantic = pytest.importorskip("pydantic")
langchain_openai = pytest.importorskip("langchain_openai")
pydantic_ai = pytest.importorskip("pydantic_ai")


class Mood(str, enum.Enum):
    happy = "happy"
    sad = "sad"


class Verdict(pydantic.BaseModel):
    """A short verdict."""

    word: str = pydantic.Field(max_length=8)
    mood: Mood
    stars: int = pydantic.Field(ge=1, le=5)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("clients"), "--max-model-len", "2048")
    try:
        srv.wait_ready()
        yield srv
    finally:
        assert srv.stop() == 0, srv.log_text()[-3000:]


def _chat(server, **kw):
    return langchain_openai.ChatOpenAI(
        base_url=server.url + "/v1", api_key="none", model="demo", temperature=0, max_tokens=300,
        max_retries=0, timeout=120, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(server, method):
    out = _chat(server).with_structured_output(Verdict, method=method).invoke("Judge this movie.")
    assert isinstance(out, Verdict)


class GetWeather(pydantic.BaseModel):
    """Weather in a city."""

    city: str = pydantic.Field(max_length=8)
    unit: Mood


def test_langchain_bind_tools(server):
    chat = _chat(server).bind_tools([GetWeather], tool_choice="GetWeather", strict=True)
    msg = chat.invoke("Weather in Oslo?")
    assert [c["name"] for c in msg.tool_calls] == ["GetWeather"]
    GetWeather.model_validate(msg.tool_calls[0]["args"])


def test_pydantic_ai_output_type(server):
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel("demo", provider=OpenAIProvider(base_url=server.url + "/v1", api_key="none"))
    agent = Agent(model, output_type=Verdict, model_settings={"temperature": 0, "max_tokens": 300})
    result = agent.run_sync("Judge this movie.")
    assert isinstance(result.output, Verdict)
    assert json.loads(result.output.model_dump_json())["stars"] in range(1, 6)
