"""One `stdio-json-repl` session: `Session.handle_request` turns one line into one response dict
and never raises (except on KeyboardInterrupt). The wire format and argument validation live in
protocol.py. The session speaks only to a `Backend`.

External preludes (those a client sends with a `prelude_id`) are stored by the backend as
preludes of kind EXTERNAL labelled with the id (`Backend.keep_prelude`): a state is found by
its tokens, whatever the label, and every id additionally gets its own stored entry, so that
`list_preludes` shows it and a new text for an id replaces that id's old entry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cached_prompts.repl import protocol
from cached_prompts.backend.interface import Backend, Completion, GenerationRequest, PreludeKind, PromptJob
from cached_prompts.commands.outputs import seeds_for
from cached_prompts.errors import CachedPromptsError, ProtocolError, WorkerGaveUpError
from cached_prompts.version import __version__
from cached_prompts.options import SamplingOptions
from cached_prompts.repl.protocol import MAX_LINE_BYTES, NO_ID
from cached_prompts.method.constraints import constraint_from_request
from cached_prompts.workspace.layout import DETERMINISTIC

log = logging.getLogger(__name__)

@dataclass
class PromptPlan:
    """A checked single_prompt request, ready to decode."""

    prelude_id: str
    prelude: list[int]
    jobs: list[PromptJob]
    sampling: SamplingOptions
    several: bool  # asked with `prompts`: the value is a list per prompt

    def request(self, jobs: list[PromptJob] | None = None) -> GenerationRequest:
        # The REPL's answers are not files: its sampled ones may draft from the prelude's pool
        # of earlier outputs (faster from the second request on; docs/drafts.md).
        return GenerationRequest(self.prelude, self.jobs if jobs is None else jobs, self.sampling,
                                 self.prelude_id, kind=PreludeKind.EXTERNAL, draft_pool=True)

    def joins(self, other: "PromptPlan") -> bool:
        """Whether the two can be decoded as one request."""
        return (self.prelude_id, self.prelude, self.sampling) == (other.prelude_id, other.prelude, other.sampling)


class Session:
    """The state of one REPL: a backend and the default sampling."""

    def __init__(self, backend: Backend, defaults: SamplingOptions) -> None:
        self.backend = backend
        self.defaults = defaults
        self.finished = False
        self.exit_status = 0  # of the service, once finished
        self.requests_batched = 0  # single_prompt lines decoded with others (--batch-waiting)
        self._commands: dict[str, tuple[type[protocol.Arguments], Callable[[Any], Any]]] = {
            "single_prompt": (protocol.SinglePromptArguments, self._single_prompt),
            "count_tokens": (protocol.CountTokensArguments, self._count_tokens),
            "precache": (protocol.PrecacheArguments, self._precache),
            "list_preludes": (protocol.NoArguments, self._list_preludes),
            "drop_prelude": (protocol.DropPreludeArguments, self._drop_prelude),
            "info": (protocol.NoArguments, self._info),
            "shutdown": (protocol.NoArguments, self._shutdown),
        }

    @property
    def commands(self) -> list[str]:
        return sorted(self._commands)

    def handle_request(self, line: bytes | str) -> dict[str, Any]:
        """The response to one request line; every failure becomes a SystemError response."""
        return self.respond(line, self.handle_parsed)

    def handle_parsed(self, command: str, arguments: Any) -> Any:
        return self._commands[command][1](arguments)

    def respond(self, line: bytes | str, act: Callable[[str, Any], Any]) -> dict[str, Any]:
        """The response to one request line whose value `act(command, arguments)` gives
        (repl_batch.py defers single_prompt this way); never raises."""
        request_id: list[Any] = [NO_ID]  # known once the line is parsed

        def value() -> Any:
            payload = protocol.parse_json5(protocol.decode_line(line))
            request_id[0] = protocol.request_id_of(payload)
            protocol.check_values(payload)
            request = protocol.split_request(payload, self._commands)
            model, _ = self._commands[request.command]
            return act(request.command, protocol.validate(model, request.arguments, f"{request.command} arguments"))

        return self.respond_with(value, lambda: request_id[0])

    def respond_with(self, value: Callable[[], Any], request_id: Callable[[], Any]) -> dict[str, Any]:
        """An Ok response with `value()`, or the SystemError response of its failure."""
        try:
            return protocol.ok(value(), request_id())
        except WorkerGaveUpError as error:  # the engine is gone for good: this answer is the last
            log.error("%s; stdio-json-repl stops", error)
            self.finished, self.exit_status = True, 1
            return protocol.failure(f"{error}; the service stops", request_id())
        except CachedPromptsError as error:
            return protocol.failure(str(error), request_id())
        except Exception as error:  # a bug; the client gets an answer and the loop goes on
            log.exception("internal error while handling a request")
            return protocol.failure(f"internal error ({type(error).__name__}: {error}); this is a bug, "
                                    "please report it with the request line", request_id())

    # ----- commands ----------------------------------------------------------------------

    def _single_prompt(self, args: protocol.SinglePromptArguments) -> list[str] | list[list[str]]:
        plan = self.plan_single_prompt(args)
        return self.answer(plan, self.backend.generate(plan.request()))

    def plan_single_prompt(self, args: protocol.SinglePromptArguments) -> PromptPlan:
        """The checked work of a single_prompt request: one job per prompt (`prompts` are
        decoded together, as outputs-test-prompts does)."""
        sampling = self._sampling(args.inference_parameters)
        if args.number_of_random_outputs == 0 and not args.add_nonrandom_output_to_front:
            raise ProtocolError("single_prompt arguments: number_of_random_outputs is 0 and "
                                "add_nonrandom_output_to_front is false, so nothing would be "
                                "generated; ask for at least one output")
        prelude = self._prelude_tokens(args.prelude_id, args.prelude)
        constraint = constraint_from_request(args.json_schema, args.grammar, self.backend)
        keys: list[int | str] = [DETERMINISTIC] if args.add_nonrandom_output_to_front else []
        keys += range(args.number_of_random_outputs)
        jobs = []
        for prompt in args.prompt_texts:
            full = self.backend.joint_tokens(args.prelude, prompt)
            self.backend.check_fits(prelude, full)
            jobs.append(PromptJob.constrained(full, seeds_for(keys, sampling), constraint))
        return PromptPlan(args.prelude_id, prelude, jobs, sampling, several=args.prompts is not None)

    def answer(self, plan: PromptPlan, completions: list[list[Completion]]) -> list[str] | list[list[str]]:
        """The value of a planned single_prompt, from its jobs' completions."""
        self.backend.keep_prelude(plan.prelude_id, plan.prelude, PreludeKind.EXTERNAL)
        texts = [[c.text for c in job_completions] for job_completions in completions]
        return texts if plan.several else texts[0]

    def _count_tokens(self, args: protocol.CountTokensArguments) -> int:
        return self.backend.count_tokens(args.text, at_start=args.as_prelude)

    def _precache(self, args: protocol.PrecacheArguments) -> dict[str, Any]:
        tokens = self._prelude_tokens(args.prelude_id, args.prelude)
        load = self.backend.prepare_prelude(tokens, args.prelude_id, kind=PreludeKind.EXTERNAL)
        self.backend.keep_prelude(args.prelude_id, tokens, PreludeKind.EXTERNAL)
        return {"prelude_id": args.prelude_id, "tokens": len(tokens), "source": load.source.value}

    def _list_preludes(self, args: protocol.NoArguments) -> list[dict[str, Any]]:
        return [{"prelude_id": p.label, "tokens": p.tokens, "bytes": p.bytes}
                for p in self.backend.kept_preludes(PreludeKind.EXTERNAL)]

    def _drop_prelude(self, args: protocol.DropPreludeArguments) -> int:
        """Entries of the id for any model or settings; the number removed."""
        return self.backend.drop_prelude(args.prelude_id, PreludeKind.EXTERNAL)

    def _info(self, args: protocol.NoArguments) -> dict[str, Any]:
        described = self.backend.describe()
        counters = self.backend.counters.public()
        counters.update(requests_batched=self.requests_batched,
                        cache_disk_reads=described.pop("cache_disk_reads", 0),
                        cache_disk_writes=described.pop("cache_disk_writes", 0))
        return {
            **described,
            "model": self.backend.model_name,
            "context_length": self.backend.n_ctx,
            "version": __version__,
            "commands": self.commands,
            "limits": {"max_line_bytes": MAX_LINE_BYTES,
                       "max_json5_line_bytes": protocol.MAX_JSON5_BYTES,
                       "max_outputs": protocol.MAX_OUTPUTS,
                       "max_prelude_id_chars": protocol.MAX_PRELUDE_ID_CHARS},
            "counters": counters,
        }

    def _shutdown(self, args: protocol.NoArguments) -> None:
        self.finished = True

    # ----- helpers -----------------------------------------------------------------------

    def _sampling(self, params: dict[str, Any]) -> SamplingOptions:
        """The defaults overridden by the request's inference_parameters, validated by the
        same options model as the command-line flags."""
        params = dict(params)
        if "temp" in params:
            if "temperature" in params:
                raise ProtocolError("single_prompt inference_parameters: 'temp' and 'temperature' are "
                                    "the same option; give only one")
            params["temperature"] = params.pop("temp")
        return protocol.validate(SamplingOptions, {**self.defaults.model_dump(), **params},
                                 "single_prompt inference_parameters", noun="inference parameter",
                                 aliases=("temp (= temperature)",))

    def _prelude_tokens(self, prelude_id: str, text: str) -> list[int]:
        if not text:
            raise ProtocolError(f"the prelude of '{prelude_id}' is empty; send its text in 'prelude'")
        return self.backend.prelude_tokens(text, f"the prelude '{prelude_id}'")

