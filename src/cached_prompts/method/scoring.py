"""`score-preludes`: how natural each example answer of a prelude is to the model.

An answer's score is the mean log-probability of its tokens, each given everything before it
in the prelude (and its perplexity, exp(-mean)). An example close to what the model would say
itself scores high; an example it finds surprising scores low, and is the one to rewrite
(the seed's method: put back answers the model produced).

One pass per prelude with logits for every position from the first answer on: the prelude's
state comes from the cache as for any request (computed and stored if missing), the part
before the first answer is shared from it, the rest is decoded once into another sequence
with `all_logits` (`Backend.token_logprobs`). Local engine only: servers do not return the
log-probabilities of prompt tokens, and say so (UnsupportedByBackendError).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cached_prompts.backend.interface import Backend
from cached_prompts.method.chat_format import AnswerMarkers, answer_spans, detect, markers_of
from cached_prompts.errors import EngineError, InputFileError
from cached_prompts.fs.files import atomic_write_text
from cached_prompts.fs.regular import read_regular
from cached_prompts.workspace.layout import CACHE, PRELUDES, Workspace, read_input_text

log = logging.getLogger(__name__)

SCORES_FILE = "prelude-scores.json"  # in llm_cache/: derived from the model, like the states
SCORES_FORMAT = 1
SHOWN_CHARS = 60
DECIMALS = 4


@dataclass
class AnswerScore:
    index: int  # the answer's place among the prelude's examples, from 0
    start: int  # character offsets of the answer in the prelude's text
    end: int
    logprobs: list[float]  # of each of its tokens
    token_spans: list[tuple[int, int]]  # character offsets of each of its tokens

    @property
    def tokens(self) -> int:
        return len(self.logprobs)

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs)

    @property
    def perplexity(self) -> float:
        return math.exp(-self.mean_logprob)


@dataclass
class PreludeScore:
    path: Path
    text: str
    tokens: int
    answers: list[AnswerScore] = field(default_factory=list)
    problem: str = ""  # why it has no scores

    @property
    def mean_logprob(self) -> float | None:
        """Over the tokens of all its answers together."""
        logprobs = [lp for answer in self.answers for lp in answer.logprobs]
        return sum(logprobs) / len(logprobs) if logprobs else None

    def weakest_first(self) -> list[AnswerScore]:
        return sorted(self.answers, key=lambda a: (a.mean_logprob, a.index))


def score_preludes(workspace: Workspace, backend: Backend, markers: AnswerMarkers | None = None
                   ) -> tuple[list[PreludeScore], list[tuple[Path, str]]]:
    """The scores of every prelude, and the preludes that could not be read (with why).
    UnsupportedByBackendError from a backend that cannot score (a server)."""
    scores, skipped = [], []
    for path in workspace.preludes():
        try:
            scores.append(score_prelude(backend, path, markers, workspace))
        except InputFileError as error:
            log.error("skipped %s: %s", path.name, error)
            skipped.append((path, str(error)))
    return scores, skipped


def score_prelude(backend: Backend, path: Path, markers: AnswerMarkers | None,
                  workspace: Workspace | None = None) -> PreludeScore:
    text = workspace.read_input(path) if workspace is not None else read_input_text(path)
    tokens = backend.prelude_tokens(text, f"{PRELUDES}/{path.name}")
    score = PreludeScore(path, text, len(tokens))
    if markers is None:
        chat = detect(text)
        if chat is None:
            score.problem = ("no turn markers of a known chat format; give the answers' markers with "
                             "--answer-marker START --answer-end END")
            return score
        markers = markers_of(chat)
    spans = answer_spans(text, markers)
    offsets = token_offsets(backend.token_pieces(tokens), text)
    members = [[i for i in range(1, len(tokens)) if start <= offsets[i][0] < end] for start, end in spans]
    found = [(span, ids) for span, ids in zip(spans, members) if ids]
    if not found:
        score.problem = "no complete example answer (an answer followed by its end marker)"
        return score
    log.info("scoring %s/%s: %d tokens, %d example answers", PRELUDES, path.name, len(tokens), len(found))
    first, end = min(ids[0] for _, ids in found), max(ids[-1] for _, ids in found) + 1
    logprobs = dict(zip(range(first, end), backend.token_logprobs(tokens, first, end, path.stem)))
    score.answers = [AnswerScore(index, start, end, [logprobs[i] for i in ids], [offsets[i] for i in ids])
                     for index, ((start, end), ids) in enumerate(found)]
    return score


# ----- tokens and their log-probabilities ----------------------------------------------------------


def token_offsets(pieces: list[bytes], text: str) -> list[tuple[int, int]]:
    """(start, end) character offsets in `text` of each token, given the bytes each spells
    (Backend.token_pieces: an added BOS spells nothing); a leading space a SentencePiece
    tokenizer added is not counted."""
    data = text.encode("utf-8")
    char_at = _char_index(text)
    spans, position = [], 0
    for piece in pieces:
        if data.startswith(piece, position):
            end = position + len(piece)
        elif piece.startswith(b" ") and data.startswith(piece[1:], position):
            end = position + len(piece) - 1
        else:
            raise EngineError(f"the tokens of the prelude do not spell its text at byte {position}; "
                              "this model's tokenizer is not supported by score-preludes")
        spans.append((char_at[position], char_at[end]))
        position = end
    return spans


def _char_index(text: str) -> list[int]:
    """For each byte offset of the UTF-8 text (and its end), the character it belongs to."""
    index = []
    for number, char in enumerate(text):
        index += [number] * len(char.encode("utf-8"))
    index.append(len(text))
    return index


# ----- rendering and the scores file ---------------------------------------------------------------


def _excerpt(score: PreludeScore, answer: AnswerScore) -> str:
    text = score.text[answer.start:answer.end].strip()
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS]


def render_json(scores: list[PreludeScore]) -> str:
    def answer_json(score: PreludeScore, answer: AnswerScore) -> dict[str, Any]:
        return {"index": answer.index, "tokens": answer.tokens, "mean_logprob": round(answer.mean_logprob, DECIMALS),
                "perplexity": round(answer.perplexity, DECIMALS), "text": _excerpt(score, answer)}

    return json.dumps([{"prelude": s.path.name, "tokens": s.tokens,
                        "mean_logprob": None if s.mean_logprob is None else round(s.mean_logprob, DECIMALS),
                        "answers": [answer_json(s, a) for a in s.answers]} for s in scores],
                      ensure_ascii=False, indent=2)


def render_text(scores: list[PreludeScore]) -> str:
    if not scores:
        return f"No preludes in {PRELUDES}/."
    blocks = []
    for score in scores:
        head = f"{PRELUDES}/{score.path.name}: {score.tokens} tokens"
        if not score.answers:
            blocks.append(f"{head}; {score.problem}")
            continue
        mean = score.mean_logprob
        lines = [f"{head}, {len(score.answers)} example answers, mean log-probability {mean:.3f} "
                 f"(perplexity {math.exp(-mean):.2f}); weakest first:",
                 f"  {'#':>3}  {'tokens':>6}  {'mean logprob':>12}  {'perplexity':>10}  answer"]
        for answer in score.weakest_first():
            lines.append(f"  {answer.index:>3}  {answer.tokens:>6}  {answer.mean_logprob:>12.3f}  "
                         f"{answer.perplexity:>10.2f}  {json.dumps(_excerpt(score, answer), ensure_ascii=False)}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def scores_path(workspace: Workspace) -> Path:
    return workspace.folder(CACHE) / SCORES_FILE


def write_scores_file(workspace: Workspace, backend: Backend, scores: list[PreludeScore]) -> Path:
    """The scores with every token's log-probability, for the report's heat map (format:
    README, "score-preludes"). Not an input: it is JSON in llm_cache/."""
    def answer_record(answer: AnswerScore) -> dict[str, Any]:
        return {"index": answer.index, "start": answer.start, "end": answer.end, "tokens": answer.tokens,
                "mean_logprob": round(answer.mean_logprob, DECIMALS),
                "perplexity": round(answer.perplexity, DECIMALS),
                "token_logprobs": [[s, e, round(lp, DECIMALS)] for (s, e), lp in
                                   zip(answer.token_spans, answer.logprobs)]}

    preludes = {s.path.name: {"sha256": hashlib.sha256(s.text.encode("utf-8")).hexdigest(), "tokens": s.tokens,
                              "answers": [answer_record(a) for a in s.answers]} for s in scores}
    document = {"format": SCORES_FORMAT, "model": backend.model_name, "model_id": backend.model_id,
                "preludes": preludes}
    path = scores_path(workspace)
    atomic_write_text(path, json.dumps(document, ensure_ascii=False, separators=(",", ":")) + "\n")
    return path


@dataclass(frozen=True)
class ShownAnswer:
    """An example answer's scores as the report shows them (from the scores file)."""

    index: int
    mean_logprob: float
    perplexity: float
    token_logprobs: list[tuple[int, int, float]]  # (start, end) character offsets, log-probability


MAX_SCORES_BYTES = 32 << 20


def read_scores(workspace: Workspace, prelude_name: str, text: str, model_id: str | None) -> list[ShownAnswer] | None:
    """The scores of preludes/`prelude_name` if the scores file has them for exactly this text
    (and this model, when `model_id` is given); None otherwise. The file is untrusted: read
    bounded, every value checked, anything odd means no scores."""
    try:
        data, _ = read_regular(scores_path(workspace), MAX_SCORES_BYTES)
        document = json.loads(data.decode("utf-8"))
        entry = document["preludes"][prelude_name]
        if document.get("format") != SCORES_FORMAT or (model_id is not None and document.get("model_id") != model_id):
            return None
        if entry["sha256"] != hashlib.sha256(text.encode("utf-8")).hexdigest():
            return None
        return [_shown_answer(answer, len(text)) for answer in entry["answers"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _shown_answer(answer: dict[str, Any], length: int) -> ShownAnswer:
    spans = [(int(start), int(end), float(lp)) for start, end, lp in answer["token_logprobs"]]
    if any(not 0 <= start <= end <= length or not math.isfinite(lp) for start, end, lp in spans):
        raise ValueError("token offsets outside the prelude")
    return ShownAnswer(int(answer["index"]), float(answer["mean_logprob"]), float(answer["perplexity"]), spans)


# ----- one example of a prelude held in memory (pick's tie-break) ----------------------------------


def last_example_logprob(backend: Backend, text: str, label: str) -> float | None:
    """The mean log-probability of the last example answer of the prelude `text` (the answer
    `pick` tries), or None if it has no chat format or no complete answer. Nothing is stored
    (Backend.token_logprobs with store=False): the part before the answer is the draft's, the
    same for every candidate, and stays prepared for the next one."""
    chat = detect(text)
    spans = answer_spans(text, markers_of(chat)) if chat is not None else []
    if not spans:
        return None
    tokens = backend.prelude_tokens(text, label)
    offsets = token_offsets(backend.token_pieces(tokens), text)
    start, end = spans[-1]
    ids = [i for i in range(1, len(tokens)) if start <= offsets[i][0] < end]
    if len(ids) < 1 or ids[0] < 2:
        return None
    logprobs = backend.token_logprobs(tokens, ids[0], ids[-1] + 1, label, store=False)
    return sum(logprobs) / len(logprobs)
