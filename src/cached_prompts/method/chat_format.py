"""Chat formats: how a model's turns are written, so that the tool can find the example
answers in a prelude (score-preludes), close an answer and open the next user turn (promote),
and write a small example in the model's own format (init).

Known: ChatML (SmolLM2, Qwen, ...), Llama 3, Gemma, Mistral `[INST]`, and the original tool's
plain `user` / `bot` lines. A format is recognised in a text by its turn markers, in a GGUF's
chat template (`tokenizer.chat_template`) by the same markers, and in a GGUF without one by
the marker being a special token of its vocabulary.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from cached_prompts.local.engine import Model


class ChatFormatKind(str, enum.Enum):
    CHATML = "chatml"
    LLAMA3 = "llama3"
    GEMMA = "gemma"
    MISTRAL = "mistral"
    PLAIN = "plain"  # the original tool's "user\n...\nbot\n..." lines


@dataclass(frozen=True)
class ChatFormat:
    """The markers of one format. A conversation is written as
    system, then for each exchange: user_open + question + user_close + assistant_open + answer
    + assistant_close. Formats without a system turn put the system text before the first
    question (`system_open` is None)."""

    kind: ChatFormatKind
    user_open: str
    user_close: str
    assistant_open: str  # what an example answer starts after
    assistant_close: str
    answer_ends: tuple[str, ...]  # what an answer ends before (the first one found)
    system_open: str | None
    system_close: str
    marker: str  # a text (or a chat template) is in this format if it contains this

    @property
    def next_turn(self) -> str:
        """What follows an answer to start the next user turn."""
        return self.assistant_close + self.user_open

    def conversation(self, system: str, exchanges: list[tuple[str, str]], question: str | None) -> str:
        """A conversation text: the system text, question/answer pairs, then (with `question`)
        a last question ending where its answer starts, else the opening of the next user turn."""
        if self.system_open is None:
            text, pending_system = "", system + "\n\n"
        else:
            text, pending_system = self.system_open + system + self.system_close, ""
        turns = list(exchanges) + ([(question, "")] if question is not None else [])
        for index, (asked, answer) in enumerate(turns):
            text += self.user_open + (pending_system if index == 0 else "") + asked + self.user_close
            text += self.assistant_open
            if index < len(exchanges):
                text += answer + self.assistant_close
        return text if question is not None else text + self.user_open


FORMATS: dict[ChatFormatKind, ChatFormat] = {
    ChatFormatKind.CHATML: ChatFormat(
        ChatFormatKind.CHATML, "<|im_start|>user\n", "<|im_end|>\n", "<|im_start|>assistant\n", "<|im_end|>\n",
        ("<|im_end|>",), "<|im_start|>system\n", "<|im_end|>\n", "<|im_start|>"),
    ChatFormatKind.LLAMA3: ChatFormat(
        ChatFormatKind.LLAMA3, "<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>", ("<|eot_id|>",),
        "<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>", "<|start_header_id|>"),
    ChatFormatKind.GEMMA: ChatFormat(
        ChatFormatKind.GEMMA, "<start_of_turn>user\n", "<end_of_turn>\n", "<start_of_turn>model\n",
        "<end_of_turn>\n", ("<end_of_turn>",), None, "", "<start_of_turn>"),
    ChatFormatKind.MISTRAL: ChatFormat(
        ChatFormatKind.MISTRAL, "[INST] ", " [/INST]", "", "</s>", ("</s>", "[INST]"), None, "", "[INST]"),
    ChatFormatKind.PLAIN: ChatFormat(
        ChatFormatKind.PLAIN, "user\n", "\n", "bot\n", "\n", ("\nuser\n",), "", "\n\n", "bot\n"),
}
# Looked for in this order: the plain format's "bot\n" could also occur in another's text.
_DETECTION_ORDER = (ChatFormatKind.CHATML, ChatFormatKind.LLAMA3, ChatFormatKind.GEMMA,
                    ChatFormatKind.MISTRAL)
_PLAIN_TURN = re.compile(r"(?:^|\n)bot\n")


def detect(text: str) -> ChatFormat | None:
    """The chat format a prelude or draft is written in, from its turn markers; None if none."""
    for kind in _DETECTION_ORDER:
        if FORMATS[kind].marker in text:
            return FORMATS[kind]
    return FORMATS[ChatFormatKind.PLAIN] if _PLAIN_TURN.search(text) else None


def detect_in_template(template: str) -> ChatFormat | None:
    """The chat format a GGUF chat template (Jinja) writes, from its markers; None if unknown."""
    for kind in _DETECTION_ORDER:
        if FORMATS[kind].marker in template:
            return FORMATS[kind]
    return None


def detect_in_vocabulary(model: Model) -> ChatFormat | None:
    """The chat format whose turn marker is one special token of the model's vocabulary
    (for a GGUF without a chat template); None if none is."""
    for kind in _DETECTION_ORDER:
        tokens = model.tokenize(FORMATS[kind].marker, at_start=False)
        if len(tokens) == 1 and model.is_special(tokens[0]):
            return FORMATS[kind]
    return None


def chat_template(model: Model) -> str | None:
    """The model's own chat template (GGUF `tokenizer.chat_template`), if it has one."""
    return model.chat_template()


@dataclass(frozen=True)
class AnswerMarkers:
    """Where example answers start and end, when the chat format does not say it."""

    start: str
    ends: tuple[str, ...]


def markers_of(chat: ChatFormat) -> AnswerMarkers:
    starts = {ChatFormatKind.MISTRAL: "[/INST]",  # with or without the space before it
              ChatFormatKind.PLAIN: "\nbot\n"}  # a line "bot", not "robot"
    return AnswerMarkers(starts.get(chat.kind, chat.assistant_open), chat.answer_ends)


def answer_spans(text: str, markers: AnswerMarkers) -> list[tuple[int, int]]:
    """(start, end) character offsets of each complete, non-empty example answer: from after
    a start marker to the first end marker after it. An answer the text leaves open (a
    draft's last turn) is not an example."""
    spans = []
    position = 0
    while (found := text.find(markers.start, position)) >= 0:
        start = found + len(markers.start)
        ends = [e for e in (text.find(end, start) for end in markers.ends) if e >= 0]
        if not ends:
            break
        end = min(ends)
        if text[start:end].strip():
            spans.append((start, end))
        position = max(end, start)
    return spans
