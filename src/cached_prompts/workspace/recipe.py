"""The recipe of an output: what, besides its input files and the model, decides its text —
the sampling options (`--max-tokens` and `--stop` among them), whether it was decoded
greedily, the grammar (its schema or grammar sidecar) and, on the local engine, whether it
was decoded with n-gram drafts (`--draft`: verified drafts can change a near-tie's last bits,
docs/drafts.md).

Like a build tool that rebuilds a target when its command line changes (ninja records each
target's command), an output made with another recipe is stale. Only what can change the
text is compared: between two greedy outputs (the deterministic one, or any made with
temperature 0) the temperature, the top-k/top-p/min-p cut-offs, mirostat and the seed do not
count, so `--seed 7` does not remake the deterministic output. The recipe is kept in the
output's record (records.py, `"recipe"`).

`draft` is the local engine's draft mode as it decodes ("auto", or "off": `--draft off`, or
a memory that cannot draft). A server does its own speculation, which no option of ours
sets: its outputs' recipes name no draft mode (None), and a recipe without one (a server's,
or a record written before the draft mode was recorded) is not compared on it, as an option
only one recipe names is not.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cached_prompts.options import Draft, SamplingOptions
from cached_prompts.workspace.sidecars import sidecar_sha256

# A greedy sampler chain is the penalties, the grammar and the argmax (engine.SamplerChain);
# a server with temperature 0 decodes greedily too. These options do not reach it.
GREEDY_IGNORES = frozenset({"temperature", "top_k", "top_p", "min_p", "mirostat_mode", "mirostat_tau",
                            "mirostat_eta", "seed"})
IGNORED = frozenset({"tfs_z"})  # accepted for compatibility, never used (options.py)


@dataclass(frozen=True)
class Grammar:
    """The sidecar an output's grammar came from: its file name and the SHA-256 of its bytes."""

    file: str
    sha256: str

    @classmethod
    def of_sidecar(cls, sidecar: Path | None) -> Grammar | None:
        """None without a sidecar; ConstraintError if it cannot be read."""
        return None if sidecar is None else cls(sidecar.name, sidecar_sha256(sidecar))


@dataclass(frozen=True)
class OptionChange:
    """One option whose value differs between an output's recipe and this run's."""

    name: str
    made_with: str  # the values as shown: 0.8, ["\\n"], none, A.gbnf (SHA-256 …)
    now: str

    def describe(self) -> str:  # "temperature 0.8 → 1.5"
        return f"{self.name} {self.made_with} → {self.now}"


@dataclass(frozen=True)
class Recipe:
    options: Mapping[str, Any] = field(default_factory=dict)  # SamplingOptions.model_dump()
    greedy: bool = False
    grammar: Grammar | None = None
    draft: Draft | None = None  # "auto" or "off" (local engine); None: not ours to say (servers)

    @classmethod
    def of(cls, sampling: SamplingOptions, *, greedy: bool, grammar: Grammar | None,
           draft: Draft | None = None) -> Recipe:
        """The recipe of an output made with `sampling`; `greedy`: decoded greedily (its
        options are then `sampling.as_greedy()`, as the record's `sampling` says); `draft`:
        the backend's draft mode (Backend.draft)."""
        options = (sampling.as_greedy() if greedy else sampling).model_dump()
        return cls(options, greedy or sampling.greedy, grammar, draft)

    def to_json(self) -> dict[str, Any]:
        grammar = None if self.grammar is None else {"file": self.grammar.file, "sha256": self.grammar.sha256}
        return {"options": dict(self.options), "greedy": self.greedy, "grammar": grammar, "draft": self.draft}

    @classmethod
    def from_json(cls, value: Any) -> Recipe | None:
        """The recipe a record kept, or None if `value` is not one."""
        if not (isinstance(value, dict) and isinstance(value.get("options"), dict)
                and isinstance(value.get("greedy"), bool)):
            return None
        draft = value.get("draft")  # absent in records written before it was recorded
        if not (draft is None or isinstance(draft, str)):
            return None
        grammar = value.get("grammar")
        if grammar is None:
            return cls(value["options"], value["greedy"], None, draft)
        if not (isinstance(grammar, dict) and isinstance(grammar.get("file"), str)
                and isinstance(grammar.get("sha256"), str)):
            return None
        return cls(value["options"], value["greedy"], Grammar(grammar["file"], grammar["sha256"]), draft)

    def changes_since(self, made_with: Recipe) -> list[OptionChange]:
        """What differs from the recipe an output was `made_with`. An option only one of them
        names (added or removed by another version of cached-prompts) is not compared: its
        value was the same for everyone who did not set it. The draft mode likewise: only
        when both recipes name one."""
        left_out = IGNORED | (GREEDY_IGNORES if self.greedy and made_with.greedy else frozenset())
        changes = [OptionChange(name, _shown(made_with.options[name]), _shown(value))
                   for name, value in self.options.items()
                   if name in made_with.options and name not in left_out
                   and made_with.options[name] != value]  # 1 == 1.0: JSON may read a float back as int
        if made_with.greedy != self.greedy and not changes:  # e.g. mirostat on with temperature 0
            changes.append(OptionChange("decoding", _decoding(made_with.greedy), _decoding(self.greedy)))
        if made_with.grammar != self.grammar:
            changes.append(OptionChange("grammar", _grammar_shown(made_with.grammar), _grammar_shown(self.grammar)))
        if made_with.draft is not None and self.draft is not None and made_with.draft != self.draft:
            changes.append(OptionChange("draft", made_with.draft, self.draft))
        return changes


def _decoding(greedy: bool) -> str:
    return "greedy" if greedy else "sampled"


def _grammar_shown(grammar: Grammar | None) -> str:
    return "none" if grammar is None else f"{grammar.file} (SHA-256 {grammar.sha256[:12]})"


def _shown(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (str, list, dict)) else str(value)
