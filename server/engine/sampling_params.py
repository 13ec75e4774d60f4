"""Per-request sampling settings (vLLM's names and meanings), and the limits on them.

The limits live here once: the HTTP schema (server/api/protocol.py) and the engine both read
them. Every number a request can set is bounded, so none can overflow a tensor constructor
inside the engine step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .structured import StructuredOutput

MAX_N = 16  # choices per prompt
MAX_CHOICES = 128  # n x prompts of one /v1/completions request (each is an engine sequence)
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 512
MAX_STOP_TOKEN_IDS = 64
MAX_TOP_K = 2**31 - 1  # a top_k above the vocabulary means "off"; an int32 keeps it a tensor value
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # any 64-bit seed, signed or not
MIN_REPETITION_PENALTY = 0.01  # seen logits divided by it stay finite (1e-300 gave inf, then NaN)
MAX_LOGIT_BIAS = 1024  # entries of logit_bias (one scatter per step, sized by it)
MAX_LOGIT_BIAS_VALUE = 100.0  # |bias|: +-100 already means "always" / "never"
GREEDY_BELOW = 1e-5  # temperatures below this are greedy (logits / t would overflow)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    max_tokens: int | None = 16  # None: up to the model's context length
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # number of top alternatives per token; 0 = only the sampled one
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured: StructuredOutput | None = None  # grammar the output must match (engine/structured.py)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def max_output_tokens(self, num_prompt: int, max_model_len: int) -> int:
        """How many tokens a sequence of this request may generate after a prompt of
        `num_prompt` tokens: max_tokens, never past the context length (max_tokens None: the
        rest of the context). The one statement of this rule: the API's defaulting, the
        engine's admission and finish check and the scheduler all ask here."""
        room = max_model_len - num_prompt
        return room if self.max_tokens is None else min(self.max_tokens, room)

    def validate(self) -> None:
        """Raise ValueError naming the field, for anything a request could get wrong."""
        checks: list[tuple[bool, str, str]] = [
            (1 <= self.n <= MAX_N, "n", f"must be in 1..{MAX_N}"),
            (self.temperature >= 0.0, "temperature", "must be >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (0 <= self.top_k <= MAX_TOP_K, "top_k", f"must be -1 (off) or in 1..{MAX_TOP_K}"),
            (0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be >= 1"),
            (self.min_tokens >= 0, "min_tokens", "must be >= 0"),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                "min_tokens",
                "must not exceed max_tokens",
            ),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]"),
            (
                MIN_REPETITION_PENALTY <= self.repetition_penalty <= 2.0,
                "repetition_penalty",
                f"must be in [{MIN_REPETITION_PENALTY}, 2]",
            ),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                "logprobs",
                f"must be between 0 and {MAX_LOGPROBS}",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"),
            # bounded: each generated chunk is matched against every stop string
            (len(self.stop) <= MAX_STOP_STRINGS, "stop", f"must have at most {MAX_STOP_STRINGS} strings"),
            (
                all(len(s) <= MAX_STOP_CHARS for s in self.stop if isinstance(s, str)),
                "stop",
                f"strings must be at most {MAX_STOP_CHARS} characters",
            ),
            (
                all(isinstance(t, int) and 0 <= t <= MAX_TOP_K for t in self.stop_token_ids),
                "stop_token_ids",
                "must be token ids",
            ),
            (
                len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
                "stop_token_ids",
                f"must have at most {MAX_STOP_TOKEN_IDS} ids",
            ),
            (self.seed is None or SEED_MIN <= self.seed <= SEED_MAX, "seed", "must be a 64-bit integer"),
        ]
        checks += self._bias_checks()
        for ok, name, why in checks:
            if not ok:
                got = repr(getattr(self, name))
                got = got if len(got) <= 120 else got[:117] + "..."
                raise ValueError(f"{name} {why} (got {got})")
        if self.structured is not None:
            if not isinstance(self.structured, StructuredOutput):
                raise ValueError("structured must be a StructuredOutput")
            self.structured.validate()

    def _bias_checks(self) -> list[tuple[bool, str, str]]:
        lb = self.logit_bias
        if lb is None:
            return []
        if not isinstance(lb, dict):
            return [(False, "logit_bias", "must map token ids to numbers")]
        return [
            (len(lb) <= MAX_LOGIT_BIAS, "logit_bias", f"must have at most {MAX_LOGIT_BIAS} entries"),
            (
                all(isinstance(t, int) and 0 <= t <= MAX_TOP_K for t in lb),
                "logit_bias",
                "keys must be token ids (integers >= 0)",
            ),
            (
                all(
                    isinstance(v, (int, float)) and -MAX_LOGIT_BIAS_VALUE <= v <= MAX_LOGIT_BIAS_VALUE
                    for v in lb.values()
                ),
                "logit_bias",
                f"values must be in [-{MAX_LOGIT_BIAS_VALUE:g}, {MAX_LOGIT_BIAS_VALUE:g}]",
            ),
        ]

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW
