"""Every message that crosses a process boundary, in one place.

MessagePack on the wire through msgspec: each message is a typed Struct that encodes
compactly (``array_like``) and is validated when decoded. Messages that share a socket are
tagged so one decoder can tell them apart; the receiver dispatches with ``match``.
No pickle anywhere on the wire.

Channels (see docs/architecture.md):

    frontend  -> pool      FrontendToPool   AddRequest | AbortRequests
    pool      -> frontend  PoolToFrontend   PoolOutputs
    pool      -> worker    PoolToWorker     PoolHello | StepPlan | Shutdown
    worker    -> pool      WorkerToPool     WorkerReady | StepResult | WorkerError
    launcher  -> pool      LauncherToPool   WorkerDied | FrontendDied | Shutdown
    launcher  -> frontend  LauncherToFrontend  NotServing
    any       -> launcher  ToLauncher       ProcessReady | ProcessFailed | WorkerDied (torchrun)

Workers are stateful, like vLLM's: a request's tokens and sampling parameters reach a worker
once (``NewRequestData``); afterwards each ``StepPlan`` carries only deltas
(``CachedRequestData``: how many tokens to run, newly appended block ids) and the ids to drop.
A request that is preempted is dropped by its worker and, when it resumes, arrives again as a
new request carrying its prompt plus the tokens it had already produced.

A pool that dies loses its requests; the frontend resubmits each one whose client is still
there to the pool's next incarnation (told apart by ``PoolStats.pool_incarnation``) as a
*continuation*: the same request with ``EngineRequest.output_token_ids``, the tokens already
streamed, which the scheduler treats exactly as a preempted request's outputs. Its workers
live on: each pool incarnation greets every worker (``PoolHello``) before its first plan to
it, and a worker greeted by an incarnation it does not know drops every request it holds and
registers again (``WorkerReady``).

A frontend that dies takes its clients' connections with it: the launcher restarts it and
tells every pool (``FrontendDied``), which aborts the requests of that frontend incarnation
(``AddRequest.frontend_incarnation``) and frees their KV.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import msgspec

#: Bumped whenever a message changes shape; processes of one engine must agree.
PROTOCOL_VERSION = 8


class _Msg(msgspec.Struct, array_like=True, omit_defaults=True, kw_only=True):
    """Base of wire messages: compact positional encoding, tagged by class name."""


# --------------------------------------------------------------------------- requests


class StructuredOutput(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A constraint on a request's output, enforced token by token with xgrammar's masks.

    ``kind`` and ``value``:

    - ``"json"``: ``value`` is a JSON schema, as JSON text;
    - ``"json_object"``: any JSON object (``value`` empty);
    - ``"regex"``: ``value`` is a regular expression the whole output matches;
    - ``"choice"``: ``value`` is a JSON list of strings, the output is one of them;
    - ``"grammar"``: ``value`` is an EBNF grammar (xgrammar's GBNF dialect, rule ``root``).

    ``any_whitespace``: JSON may hold any whitespace between tokens; by default it is compact
    (a weak model otherwise runs away in whitespace and never closes the object).
    """

    kind: str
    value: str = ""
    any_whitespace: bool = False


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """How to pick each next token, and when to stop.

    ``temperature == 0`` is greedy. ``top_k == 0`` and ``top_p == 1`` disable those filters.
    ``logprobs``: None returns no logprobs; ``k >= 0`` returns each sampled token's logprob
    and the ``k`` most likely tokens with theirs (from the raw logits, before penalties and
    temperature, as vLLM's default).
    ``seed`` makes sampling reproducible per request, independent of batch composition, of
    the worker that runs it, and of preemption (the n-th token uses a generator seeded from
    ``(seed, n)``). ``stop`` strings are matched by the frontend on detokenized text; token
    stops (``stop_token_ids`` and EOS unless ``ignore_eos``) are applied by the scheduler.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_tokens: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    repetition_penalty: float = 1.0
    #: OpenAI's penalties over the output tokens so far: ``presence`` once per distinct
    #: token, ``frequency`` per occurrence, subtracted from the logits.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: (token id, bias in [-100, 100]) added to the logits before sampling.
    logit_bias: tuple[tuple[int, float], ...] = ()
    #: When non-empty, only these tokens may be sampled (vLLM's ``allowed_token_ids``).
    allowed_token_ids: tuple[int, ...] = ()
    #: When set (k >= 0), the logprob of every prompt token after the first and the k most
    #: likely tokens at each prompt position (vLLM's ``prompt_logprobs``).
    prompt_logprobs: int | None = None
    #: Structured output: the output must follow this grammar (see ``StructuredOutput``).
    structured: StructuredOutput | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class EngineRequest(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A tokenized request as the scheduler receives it.

    ``output_token_ids``: a continuation (a request resubmitted after its pool died) carries
    the tokens it already produced. They count as outputs for everything: ``max_tokens``
    and ``min_tokens`` (``sampling`` is the original, not reduced), token stops, penalties,
    the seeded sampler's position and a grammar's state; prompt logprobs are not sent again.
    Its outputs are the tokens after them.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = SamplingParams()
    priority: int = 0
    arrival_time: float = 0.0
    eos_token_ids: tuple[int, ...] = ()
    tenant: str = ""
    cache_salt: str = ""
    output_token_ids: tuple[int, ...] = ()


class AddRequest(_Msg, tag=True):
    """``frontend_incarnation``: the frontend process that sent it (0, then 1, 2, ... per
    restart): a pool told that incarnation died (``FrontendDied``) aborts its requests and
    drops any of its ``AddRequest``s still on the way."""

    request: EngineRequest
    frontend_incarnation: int = 0


class AbortRequests(_Msg, tag=True):
    request_ids: list[str]


class Explanation(_Msg):
    """Why the scheduler did what it did with one request (on its final output).

    ``placement_scores`` maps worker id to the placement score it got when the request was
    (last) placed; ``predicted_cached_tokens`` is the prefix the chosen worker held then, and
    ``realized_cached_tokens`` what it held at admission.
    """

    worker_id: int
    placement: str
    placement_scores: dict[int, float]
    predicted_cached_tokens: int
    realized_cached_tokens: int
    queue_time_s: float
    num_preemptions: int


class PromptLogprobs(_Msg):
    """Prompt logprobs of one request for consecutive prompt positions (one step's chunk).

    Row ``j`` scores prompt token ``first + j`` (``first >= 1``: the first prompt token has
    no logprob) given the tokens before it: its ``logprob``, its ``rank`` in the model's
    distribution (1 is the most likely) and the ``k`` most likely tokens with their logprobs,
    best first (``k`` is the request's ``prompt_logprobs``). Raw model distribution
    (``log_softmax`` of the logits, no sampling parameter applied), as vLLM's.
    """

    request_id: str
    first: int
    token_logprobs: list[float]
    ranks: list[int]
    top_token_ids: list[list[int]] = []
    top_logprobs: list[list[float]] = []

    def trimmed(self, first: int) -> PromptLogprobs | None:
        """The rows from prompt token ``first`` on (None if there are none)."""
        skip = first - self.first
        if skip <= 0:
            return self
        if skip >= len(self.token_logprobs):
            return None
        return PromptLogprobs(
            request_id=self.request_id, first=first,
            token_logprobs=self.token_logprobs[skip:], ranks=self.ranks[skip:],
            top_token_ids=self.top_token_ids[skip:], top_logprobs=self.top_logprobs[skip:],
        )


class PoolTiming(_Msg):
    """Where a request's time went inside its pool, up to its first token (unix seconds of
    the pool's clock, which is the frontend's on one machine): carried by the request's first
    ``RequestOutput`` that has tokens, for the frontend's ``Server-Timing``
    (engine/frontend/timing.py; engine/pool/first_token.py stamps them).

    ``arrived``: the pool's loop took its ``AddRequest`` off the socket; ``scheduled``: it was
    first in a plan; ``step_sent`` / ``step_done``: the plan that gave its first token went to
    its worker / its result came back (``execute_s``: the worker's own time for it;
    ``step_tokens`` / ``step_requests``: that step's size); ``sent``: the output went out to
    the frontend. ``received`` is the frontend's: when its pool client read the output.
    """

    arrived: float
    scheduled: float
    step_sent: float
    step_done: float
    execute_s: float = 0.0
    step_tokens: int = 0
    step_requests: int = 0
    sent: float = 0.0
    received: float = 0.0
    #: What its ``queue`` waited for: the step its worker ran before the one that first held
    #: it (went out / came back; 0.0 if none; its size), and how many steps (all workers)
    #: came back while it waited: more than a worker's one means the policy passed it over.
    prev_step_sent: float = 0.0
    prev_step_done: float = 0.0
    prev_step_tokens: int = 0
    queue_steps: int = 0


class RequestOutput(_Msg):
    """New tokens for one request from one step; ``finish_reason`` set on its last one.

    ``prompt_logprobs`` (requests that ask for them): the prompt positions scored since the
    previous output, each position sent once; an output may carry them with no new token (a
    prefill chunk), and every position is sent before or with the first new token (or the
    finish of a ``max_tokens`` 0 request, which produces no token).

    finish_reason: "stop" (EOS or a stop token), "length" (max_tokens or the model's context),
    "abort" (aborted by the client or the frontend), "error" (see ``error``).
    """

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    logprobs: list[float] | None = None
    error: str = ""
    explanation: Explanation | None = None
    top_token_ids: list[list[int]] | None = None  # per new token, as in StepResult
    top_logprobs: list[list[float]] | None = None
    prompt_logprobs: PromptLogprobs | None = None
    timing: PoolTiming | None = None  # on the first output with tokens: engine.pool.first_token


class PoolStats(_Msg):
    """A pool's pressure, for admission control and metrics; also its heartbeat.

    ``pool_incarnation``: a random id the pool process draws at start, the same on every
    stats it sends. A frontend that sees it change knows the pool was restarted (its
    requests are lost: resubmit them) and drops late messages of the old one. 0: unknown.
    """

    num_waiting: int = 0
    num_running: int = 0
    num_waiting_tokens: int = 0
    kv_usage: list[float] = []
    num_free_blocks: list[int] = []
    num_preemptions: int = 0
    live_workers: int = 0
    prefix_query_tokens: int = 0  # prompt tokens looked up in the prefix cache, cumulative
    prefix_hit_tokens: int = 0  # of which found cached
    worker_ids: list[int] = []  # the live workers, in the order of the per-worker lists
    num_waiting_per_worker: list[int] = []
    block_size: int = 0  # tokens per KV block (the scheduler's, as every worker's)
    num_blocks: list[int] = []  # each live worker's KV capacity in blocks, as num_free_blocks
    # One entry per step finished since the previous stats: requests in the batch, tokens
    # run, and the time from sending the plan to receiving its result.
    step_batch_sizes: list[int] = []
    step_num_tokens: list[int] = []
    step_times_s: list[float] = []
    pool_incarnation: int = 0
    step_worker_ids: list[int] = []  # the worker of each step above
    # Workers kept free of sheddable requests now (``--reserved-workers``): admission judges
    # the load of sheddable work by the others.
    reserved_worker_ids: list[int] = []


class PoolOutputs(_Msg, tag=True):
    outputs: list[RequestOutput]
    stats: PoolStats | None = None


# --------------------------------------------------------------------------- steps


class NewRequestData(_Msg):
    """First sight of a request on a worker (or its return after preemption).

    ``token_ids`` holds every known token: the prompt plus tokens generated before a
    preemption. ``num_computed_tokens`` of them already have KV in ``block_ids`` (a prefix
    cache hit); this step runs the next ``num_scheduled_tokens``.
    """

    request_id: str
    token_ids: list[int]
    sampling: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    num_scheduled_tokens: int
    num_output_tokens: int = 0


class CachedRequestData(_Msg):
    """A request the worker already holds: run ``num_scheduled_tokens`` more tokens.

    The worker appends the token it sampled last step itself, so decodes need no token ids.
    """

    request_id: str
    num_scheduled_tokens: int
    new_block_ids: list[int] = []


class StepPlan(_Msg, tag=True):
    """One forward pass for one worker: a ragged batch of prefill chunks and decodes.

    ``incarnation``: the worker incarnation the plan is for; any other incarnation (a
    restarted worker that took over the dead one's address) drops it unread."""

    step_id: int
    worker_id: int
    incarnation: int = 0
    new_requests: list[NewRequestData] = []
    cached_requests: list[CachedRequestData] = []
    finished_request_ids: list[str] = []

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(n for _, n in self.scheduled())

    def scheduled(self) -> list[tuple[str, int]]:
        """(request id, tokens to run) for every request in the step, new ones first."""
        return [(r.request_id, r.num_scheduled_tokens) for r in self.new_requests] + [
            (r.request_id, r.num_scheduled_tokens) for r in self.cached_requests
        ]

    @property
    def num_requests(self) -> int:
        return len(self.new_requests) + len(self.cached_requests)


class StepResult(_Msg, tag=True):
    """Tokens sampled by one step, for the requests whose scheduled tokens reached the end
    of their known tokens (a prefill chunk that stops short of the end samples nothing).

    ``incarnation``: the worker incarnation that ran the step (the pool drops results of an
    incarnation that is no longer the worker's current one)."""

    step_id: int
    worker_id: int
    request_ids: list[str]
    token_ids: list[int]
    incarnation: int = 0
    logprobs: list[float] | None = None
    execute_time_s: float = 0.0
    # Per sampled row, the request's ``logprobs`` most likely tokens and their logprobs, best
    # first (empty rows for requests that asked for none); None when no row asked.
    top_token_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None
    # Prompt logprobs of the requests that ask for them, for the prompt positions this step
    # computed (a runner may also hold a request's rows back and send them with its last
    # prompt chunk: vLLM's does); None when there are none.
    prompt_logprobs: list[PromptLogprobs] | None = None
    #: Requests whose grammar (structured output) ended with this step's token: the
    #: scheduler finishes them with "stop", even under ``ignore_eos``.
    grammar_ended_ids: list[str] = []


class PoolHello(_Msg, tag=True):
    """A pool incarnation's first message to a worker, before any plan to it. A worker that
    does not know ``pool_incarnation`` (``PoolStats.pool_incarnation``) drops every request
    it holds (they were the dead pool's) and answers ``WorkerReady``; everything the worker
    receives before the hello is the previous incarnation's, everything after it this one's."""

    pool_incarnation: int


class WorkerReady(_Msg, tag=True):
    """A worker's hello: its KV capacity in blocks, sent at start (and at restart) and in
    answer to each new pool incarnation's ``PoolHello``."""

    worker_id: int
    num_blocks: int
    block_size: int
    incarnation: int = 0
    protocol_version: int = PROTOCOL_VERSION
    # The worker's process id, when it is one process on the pool's host (dials its ipc://
    # socket, no tensor-parallel group); 0 otherwise. The pool may pause it (SIGSTOP)
    # while a critical step runs elsewhere (engine/pool/suspend.py).
    pid: int = 0


class WorkerError(_Msg, tag=True):
    """A step failed on the worker; the pool fails the step's requests, not the engine
    (only if ``step_id`` and ``incarnation`` are those of the step in flight)."""

    step_id: int
    worker_id: int
    message: str
    incarnation: int = 0


class WorkerDied(_Msg, tag=True):
    """This incarnation of a worker exited; a new one is being started. From the launcher to
    the pool; under torchrun, from the rank that restarts it to the launcher, which passes
    it on."""

    worker_id: int
    incarnation: int = 0
    pool_index: int = 0  # read by the launcher (the pool knows its own)


class FrontendDied(_Msg, tag=True):
    """From the launcher to every pool: this incarnation of the frontend exited (it is being
    restarted). Every request it sent is abandoned (its client's connection died with it):
    the pool aborts them, freeing their KV, and drops its ``AddRequest``s that come later."""

    incarnation: int = 0


class NotServing(_Msg, tag=True):
    """From the launcher to the frontend: the engine is about to stop (a restart storm);
    health says NOT_SERVING with ``reason`` until it does."""

    reason: str


class Shutdown(_Msg, tag=True):
    reason: str = ""


class ProcessReady(_Msg, tag=True):
    name: str
    info: dict[str, Any] = {}


class ProcessFailed(_Msg, tag=True):
    name: str
    message: str


FrontendToPool: TypeAlias = AddRequest | AbortRequests
PoolToFrontend: TypeAlias = PoolOutputs
PoolToWorker: TypeAlias = PoolHello | StepPlan | Shutdown
WorkerToPool: TypeAlias = WorkerReady | StepResult | WorkerError
LauncherToPool: TypeAlias = WorkerDied | FrontendDied | Shutdown
LauncherToFrontend: TypeAlias = NotServing
ToLauncher: TypeAlias = ProcessReady | ProcessFailed | WorkerDied
