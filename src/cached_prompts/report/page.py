"""The HTML report: one self-contained page (inline CSS and JS, no request to the network,
works from file://) with every prelude, draft and test prompt and their outputs side by side.

Every piece of workspace text is escaped with html.escape; the only data handed to the
page's script is JSON in a `<script type="application/json">` block with `<`, `>` and `&`
escaped, and a Content-Security-Policy lets only the page's own script (by its hash) run and
forbids every request, so even a mistake in escaping could neither run nor fetch anything.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Iterable
from functools import cache
from html import escape
from importlib import resources
from pathlib import Path
from typing import Protocol

from cached_prompts.fs.files import atomic_write_text
from cached_prompts.method.checking import Rate
from cached_prompts.options import Draft, SamplingOptions
from cached_prompts.report.data import (FileText, InputKind, InputView, OutputState, OutputView, PreludeView, ReportData,
                          TokenCounter, collect)
from cached_prompts.workspace.layout import Workspace

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
# The sampling options a card names in its one-line summary, with their short labels.
_SAMPLING_SHORT = (("temperature", "temp"), ("top_k", "top-k"), ("top_p", "top-p"), ("min_p", "min-p"),
                   ("repeat_penalty", "repeat"), ("max_tokens", "max"))


def build_report(workspace: Workspace, *, count_tokens: TokenCounter | None, n_ctx: int | None,
                 model_id: str | None = None, sampling: SamplingOptions | None = None, run_id: str | None = None,
                 skipped: Iterable[tuple[Path, str]] = (), live: bool = False, draft: Draft | None = None) -> str:
    """The report page of `workspace` as HTML text.

    count_tokens(text, at_start) counts tokens (at_start=True for a prelude or draft; it may
    answer None: not known); without it, counts come from the outputs' records where there are
    some. An output whose record names another model than `model_id`, or made with other
    options than `sampling` or another draft mode than `draft`, is stale (as the commands
    judge it: workspace/outputs.py).
    `skipped` adds the inputs a run skipped, with its reasons; `run_id` names the run the page
    is made for. `live`: the page `watch` serves, which also runs live.js and may connect to
    its own server.
    """
    data = collect(workspace, count_tokens=count_tokens, n_ctx=n_ctx, model_id=model_id, sampling=sampling,
                   run_id=run_id, skipped=skipped, draft=draft)
    return render(data, live=live)


class TokenSource(Protocol):
    """What the report needs from a backend: token counts, context length, model identity,
    draft mode."""

    @property
    def n_ctx(self) -> int: ...

    @property
    def model_id(self) -> str: ...

    @property
    def draft(self) -> Draft | None: ...

    def count_tokens(self, text: str, *, at_start: bool) -> int: ...


def refresh_report(workspace: Workspace, backend: TokenSource, path: Path | None = None, *,
                   sampling: SamplingOptions | None = None, run_id: str | None = None,
                   skipped: Iterable[tuple[Path, str]] = ()) -> Path:
    """Build the page with the backend's token counts and write it; returns where. Outputs
    are judged as a run with `sampling` would judge them."""
    html = build_report(workspace, count_tokens=lambda text, at_start: backend.count_tokens(text, at_start=at_start),
                        n_ctx=backend.n_ctx, model_id=backend.model_id, sampling=sampling, run_id=run_id,
                        skipped=skipped, draft=backend.draft)
    return write_report(workspace, path, html)


def default_report_path(workspace: Workspace) -> Path:
    return workspace.root / REPORT_FILE


def write_report(workspace: Workspace, path: Path | None, html: str) -> Path:
    """Write the page atomically (a symlink at `path` is replaced, not followed); `path` None
    means report.html at the workspace root, a relative path is taken from the root."""
    target = default_report_path(workspace) if path is None else workspace.root / path
    atomic_write_text(target, html)
    return target


# ----- assets and escaping -------------------------------------------------------------------------


@cache
def _asset(name: str) -> str:
    return resources.files(__package__).joinpath("assets").joinpath(name).read_text(encoding="utf-8")


def _sha256_source(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


def _e(text: object) -> str:
    return escape(str(text), quote=True)


def json_for_script(value: object) -> str:
    """JSON safe inside a <script> element: no `<`, `>` or `&` that could close or open a tag."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def _when(iso: str) -> str:
    return iso.replace("T", " ").replace("Z", " UTC")


# ----- page ------------------------------------------------------------------------------------------


def content_security_policy(*, live: bool) -> str:
    """Only the page's own scripts (by hash) run; the static page may request nothing, the
    live page only its own server (the page again, and the live channel)."""
    scripts = [_asset("report.js"), *([_asset("live.js")] if live else [])]
    hashes = " ".join(f"'{_sha256_source(script)}'" for script in scripts)
    connect = "; connect-src 'self'" if live else ""
    return (f"default-src 'none'; style-src 'unsafe-inline'; img-src data:; script-src {hashes}{connect}; "
            "base-uri 'none'; form-action 'none'")


def render(data: ReportData, *, live: bool = False) -> str:
    script = _asset("report.js")
    csp = content_security_policy(live=live)
    live_parts = ([f"<style>\n{_asset('live.css')}</style>\n"], [f"<script>{_asset('live.js')}</script>\n"]) \
        if live else ([], [])
    page_data = {"made": data.made, "run_id": data.run_id, "n_ctx": data.n_ctx, "workspace": data.workspace_name,
                 "outputs": len([o for o in data.outputs() if o.state is not OutputState.MISSING]),
                 "stale": data.count(OutputState.STALE), "missing": data.count(OutputState.MISSING),
                 "skipped": len(data.skipped)}
    return "".join([
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n",
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{_e(csp)}\">\n",
        "<meta name=\"color-scheme\" content=\"light dark\">\n<link rel=\"icon\" href=\"data:,\">\n",
        f"<title>{_e(data.workspace_name)} · cached-prompts report</title>\n",
        f"<style>\n{_asset('report.css')}</style>\n", *live_parts[0], "</head>\n<body>\n",
        _header(data), "<main id=\"main\">\n", _skipped_section(data), _drafts_section(data),
        *(_prelude_section(prelude, data, index) for index, prelude in enumerate(data.preludes)),
        _orphans_section(data), _stray_section(data), "<p id=\"no-match\" hidden>Nothing matches the filter.</p>\n",
        "</main>\n",
        f"<script type=\"application/json\" id=\"report-data\">{json_for_script(page_data)}</script>\n",
        f"<script>{script}</script>\n", *live_parts[1], "</body>\n</html>\n",
    ])


def _header(data: ReportData) -> str:
    latest = data.latest_run()
    run = (f" for run <code>{_e(data.run_id)}</code>" if data.run_id else
           f" · newest outputs from run <code>{_e(latest)}</code>" if latest else "")
    models = ", ".join(data.models)
    facts = [f"made <time datetime=\"{_e(data.made)}\">{_e(_when(data.made))}</time>{run}"]
    if models:
        facts.append(f"model {_e(models)}")
    if data.n_ctx:
        facts.append(f"context {data.n_ctx:,} tokens")
    outputs = len(data.outputs()) - data.count(OutputState.MISSING)
    prompts = sum(len(p.prompts) for p in data.preludes) + len(data.orphan_prompts)
    summary = [(len(data.preludes), "prelude", ""), (prompts, "test prompt", ""), (len(data.drafts), "draft", ""),
               (outputs, "output", ""), (data.count(OutputState.STALE), "stale output", "warn"),
               (data.count(OutputState.MISSING), "missing output", "warn"), (len(data.skipped), "skipped input", "bad")]
    items = "".join(
        f"<li class=\"{cls if count else 'zero'}\" data-count=\"{_e(noun.replace(' ', '-'))}\">"
        f"<b>{count:,}</b> {_e(_plural(count, noun).split(' ', 1)[1])}</li>"
        for count, noun, cls in summary)
    return (
        "<header class=\"top\">\n"
        f"<h1><span class=\"ws\">{_e(data.workspace_name)}</span> <span class=\"sub\">cached-prompts report</span></h1>\n"
        f"<p class=\"facts\">{' · '.join(facts)}</p>\n<ul class=\"summary\">{items}</ul>\n</header>\n"
        "<div class=\"toolbar\" role=\"search\">"
        "<input id=\"filter\" type=\"search\" placeholder=\"Filter prompts and outputs\" "
        "aria-label=\"Filter prompts and outputs\" autocomplete=\"off\" spellcheck=\"false\">"
        "<label class=\"only\"><input type=\"checkbox\" id=\"only-attention\"> only stale, missing, skipped</label>"
        "<label class=\"only\"><input type=\"checkbox\" id=\"only-failing\"> only failing</label>"
        "<span id=\"shown\" aria-live=\"polite\"></span>"
        "<span class=\"keys\"><kbd>j</kbd> <kbd>k</kbd> next / previous · <kbd>/</kbd> filter · "
        "<kbd>Esc</kbd> clear</span>"
        "<span class=\"legend\" aria-hidden=\"true\"><i class=\"l-prelude\"></i>prelude <i class=\"l-prompt\"></i>prompt "
        "<i class=\"l-output\"></i>output</span></div>\n")


def _skipped_section(data: ReportData) -> str:
    if not data.skipped:
        return ""
    rows = "".join(f"<li><code>{_e(name)}</code> {_e(reason)}</li>" for name, reason in data.skipped)
    return (f"<section class=\"group skipped\" id=\"skipped\"><h2>Skipped inputs <span class=\"count\">"
            f"{len(data.skipped)}</span></h2>\n<ul class=\"reasons\">{rows}</ul></section>\n")


def _items_section(section_id: str, group: str, title: str, count: str, items: list[InputView],
                   data: ReportData) -> str:
    """A group of input cards (drafts, or test prompts without a prelude); nothing when empty."""
    if not items:
        return ""
    cards = "".join(_item(item, data) for item in items)
    return (f"<section class=\"group\" id=\"{section_id}\" data-group=\"{group}\"><h2>{title} "
            f"<span class=\"count\">{count}</span></h2>\n{cards}</section>\n")


def _drafts_section(data: ReportData) -> str:
    return _items_section("drafts", "drafts", "Drafts", _plural(len(data.drafts), "draft"), data.drafts, data)


def _prelude_section(prelude: PreludeView, data: ReportData, index: int) -> str:
    reasons = "".join(f"<p class=\"skip\">Skipped: {_e(r)}</p>" for r in prelude.skipped)
    prompts = "".join(_item(item, data) for item in prelude.prompts) or \
        "<p class=\"none\">No test prompts use this prelude.</p>"
    return (f"<section class=\"group\" id=\"prelude-{index}\" data-group=\"{_e(prelude.name)}\">"
            f"<h2><span class=\"kind\">prelude</span> <span class=\"name\">{_e(prelude.name)}</span> "
            f"<span class=\"count\">{_plural(len(prelude.prompts), 'test prompt')}</span>"
            f"{_rate(prelude.rate) if prelude.rate else ''}</h2>\n{reasons}"
            f"{_source(prelude.file, 'prelude text', open_=False)}{_heat_map(prelude)}{prompts}</section>\n")


# Log-probability at which a token is shown fully red in the heat map.
_HEAT_FLOOR = -8.0


def _heat_map(prelude: PreludeView) -> str:
    """The prelude's text with each example answer's tokens shaded by how unlikely the model
    found them (score-preludes); redder = less natural. Hover a token for its log-probability."""
    if not prelude.scores or prelude.file.text is None:
        return ""
    text, parts, position = prelude.file.text, [], 0
    for start, end, logprob in sorted(span for answer in prelude.scores for span in answer.token_logprobs):
        if start < position:
            continue  # overlapping spans (a damaged scores file): show the first
        alpha = max(0.0, min(1.0, logprob / _HEAT_FLOOR)) * 0.85
        parts.append(_e(text[position:start]))
        parts.append(f"<span class=\"tok\" style=\"background:rgba(230,50,40,{alpha:.2f})\" "
                     f"title=\"log p {logprob:.2f}\">{_e(text[start:end])}</span>")
        position = end
    parts.append(_e(text[position:]))
    weakest = min(prelude.scores, key=lambda a: a.mean_logprob)
    rows = "".join(f"<li>example {a.index}: mean log p {a.mean_logprob:.3f}, perplexity {a.perplexity:.2f}</li>"
                   for a in sorted(prelude.scores, key=lambda a: a.mean_logprob))
    summary = (f"example answers by log-probability · weakest: example {weakest.index} "
               f"(mean {weakest.mean_logprob:.2f})")
    return (f"<details class=\"source heat\" data-scores=\"{len(prelude.scores)}\"><summary>{_e(summary)}</summary>"
            f"<ul class=\"reasons\">{rows}</ul><pre>{''.join(parts)}</pre></details>\n")


def _orphans_section(data: ReportData) -> str:
    return _items_section("orphans", "", "Test prompts without a usable prelude", str(len(data.orphan_prompts)),
                          data.orphan_prompts, data)


def _stray_section(data: ReportData) -> str:
    if not data.stray_outputs:
        return ""
    rows = "".join(f"<li><code>{_e(name)}</code></li>" for name in data.stray_outputs)
    return ("<section class=\"group stray\" id=\"stray\"><h2>Outputs whose input is gone <span class=\"count\">"
            f"{len(data.stray_outputs)}</span></h2>\n<ul class=\"reasons\">{rows}</ul></section>\n")


# ----- one draft or test prompt ----------------------------------------------------------------------


def _tokens(count: int | None) -> str:
    return f"{_plural(count, 'token')}" if count is not None else "? tokens"


def _source(file: FileText, label: str, *, open_: bool) -> str:
    """A collapsible view of an input's text with its token count."""
    if file.text is None:
        return ""  # unreadable: its reason is among the input's skip reasons
    summary = f"{label} · {_tokens(file.tokens)}"
    return (f"<details class=\"source\"{' open' if open_ else ''}><summary>{_e(summary)}</summary>"
            f"<pre>{_e(file.text)}</pre></details>\n")


def _item(item: InputView, data: ReportData) -> str:
    attention = bool(item.skipped) or any(o.state is not OutputState.FRESH for o in item.outputs)
    is_draft = item.kind is InputKind.DRAFT
    reasons = "".join(f"<p class=\"skip\">Skipped: {_e(r)}</p>" for r in item.skipped)
    if item.check_problem:
        reasons += f"<p class=\"skip\">Not checked: {_e(item.check_problem)}</p>"
    cards = "".join(_card(o, item, data) for o in item.outputs) or "<p class=\"none\">No outputs.</p>"
    checked = item.checked
    failing = checked is not None and (not checked.reaches_threshold or any(not o.passed for o in checked.outputs))
    counts = f"{_plural(len([o for o in item.outputs if o.state is not OutputState.MISSING]), 'output')}"
    return (f"<article class=\"item\" tabindex=\"-1\" data-kind=\"{item.kind.value}\" data-name=\"{_e(item.name)}\" "
            f"data-attention=\"{str(attention).lower()}\" data-failing=\"{str(failing).lower()}\">"
            f"<h3><span class=\"kind\">{_e(item.kind.value)}</span> <span class=\"name\">{_e(item.name)}</span>"
            f"<span class=\"count\">{counts}</span>"
            f"{_rate(checked.rate, checked.expectations.threshold, checked.reaches_threshold) if checked else ''}"
            f"</h3>\n{reasons}"
            f"{_source(item.file, 'draft text' if is_draft else 'prompt', open_=not is_draft)}"
            f"<div class=\"cards\">{cards}</div></article>\n")


def _card(output: OutputView, item: InputView, data: ReportData) -> str:
    label = "deterministic" if output.deterministic else f"#{output.key}"
    badges = "<span class=\"badge greedy\" title=\"greedy: temperature 0\">greedy</span>" if output.deterministic else ""
    if output.state is OutputState.MISSING:
        command = "outputs-for-drafts" if item.kind is InputKind.DRAFT else "outputs-test-prompts"
        return (f"<div class=\"card missing\" data-missing-output=\"{_e(output.name)}\">"
                f"<div class=\"card-head\"><span class=\"key\">{_e(label)}</span>{badges}"
                f"<span class=\"badge missing\">missing</span></div>"
                f"<p class=\"note\">Not made yet: <code>cached-prompts {command}</code> makes it.</p></div>")
    stale = output.state is OutputState.STALE
    if stale:
        badges += f"<span class=\"badge stale\" title=\"{_e(output.why_stale)}\">stale</span>"
    badges += _check_mark(output)
    file = output.file
    text = f"<pre class=\"out\">{_e(file.text)}</pre>" if file and file.text is not None else \
        f"<p class=\"skip\">{_e(output.name)} {_e(file.problem if file else '')}</p>"
    classes = " ".join(c for c in ["card", "det" if output.deterministic else "", "stale" if stale else ""] if c)
    return (f"<div class=\"{classes}\" data-output=\"{_e(output.name)}\" data-stale=\"{str(stale).lower()}\" "
            f"data-key=\"{_e(output.key)}\"><div class=\"card-head\"><span class=\"key\">{_e(label)}</span>{badges}"
            f"<span class=\"tokens\">{_tokens(output.tokens)}</span><span class=\"sim\"></span>"
            f"<button type=\"button\" class=\"ref-button\" title=\"highlight how the other outputs differ from this one\">"
            f"compare</button></div>{_context_bar(output, item, data)}{text}{_record(output, data)}</div>")


def _rate(rate: Rate, threshold: float | None = None, reaches: bool = True) -> str:
    """k/n passed, the rate and its 95% interval (and the threshold, for a prompt)."""
    low, high = rate.interval
    percent = "-" if rate.rate is None else f"{100 * rate.rate:.0f}%"
    text = f"{rate.passed}/{rate.total} passed · {percent} [{100 * low:.0f}%, {100 * high:.0f}%]"
    title = "pass rate with its 95% Wilson interval"
    if threshold is not None:
        text += f" · needs {100 * threshold:.0f}%"
        title += "; under the threshold" if not reaches else ""
    cls = "rate" if reaches else "rate under"
    return f"<span class=\"{cls}\" title=\"{_e(title)}\">{_e(text)}</span>"


def _check_mark(output: OutputView) -> str:
    """Pass or fail against the expectations; hover names the failing checks."""
    checked = output.checked
    if checked is None:
        return ""
    if checked.passed:
        return "<span class=\"badge check pass\" title=\"passes every check\">pass</span>"
    said = [f"{f.name} ({f.why})" for f in checked.failed]
    if checked.why and not said:
        said.append(f"{checked.status.value}: not counted as a pass")
    return f"<span class=\"badge check fail\" title=\"{_e('; '.join(said))}\">fail</span>"


def _context_bar(output: OutputView, item: InputView, data: ReportData) -> str:
    record = output.record
    n_ctx = record.n_ctx if record else data.n_ctx
    prelude = record.prelude_tokens if record else item.prelude_tokens
    prompt = record.prompt_tokens if record else item.prompt_tokens
    parts = [("prelude", prelude), ("prompt", prompt), ("output", output.tokens)]
    if not n_ctx or any(count is None for _, count in parts):
        return ""
    total = sum(count or 0 for _, count in parts)
    spans = "".join(f"<span class=\"c-{name}\" style=\"width:{min(100.0, 100.0 * (count or 0) / n_ctx):.2f}%\"></span>"
                    for name, count in parts)
    sums = " + ".join(f"{name} {count:,}" for name, count in parts)
    over = " over" if total > n_ctx else ""
    return (f"<div class=\"ctx{over}\" title=\"{_e(sums)} = {total:,} of {n_ctx:,}\" role=\"img\" "
            f"aria-label=\"{_e(sums)} = {total:,} of {n_ctx:,} tokens\"><div class=\"bar\">{spans}</div>"
            f"<span class=\"ctx-n\">{total:,} / {n_ctx:,}</span></div>")


def _record(output: OutputView, data: ReportData) -> str:
    record = output.record
    if record is None:
        return "<div class=\"rec none\">no record of how it was made</div>"
    speed = f"{record.tokens_per_second:.1f} tok/s" if record.tokens_per_second is not None else ""
    seed = "greedy" if record.seed is None else f"seed {record.seed}"
    model = record.model if len(data.models) > 1 else ""  # one model: the header names it
    summary = " · ".join(part for part in [model, seed, speed] if part)
    sampling = " · ".join(f"{short} {record.sampling[name]}" for name, short in _SAMPLING_SHORT
                          if name in record.sampling)
    rows = [("model", record.model), ("backend", record.backend), ("sampling", sampling),
            ("seed", "none (greedy)" if record.seed is None else record.seed), ("made", _when(record.created)),
            ("run", record.run_id), ("speed", f"{record.generated_tokens} tokens in {record.seconds:.2f} s"),
            ("tokens", f"prelude {record.prelude_tokens} + prompt {record.prompt_tokens}, context {record.n_ctx}"),
            ("options", json.dumps(record.sampling, ensure_ascii=False, sort_keys=True))]
    cells = "".join(f"<dt>{_e(name)}</dt><dd>{_e(value)}</dd>" for name, value in rows)
    return f"<details class=\"rec\"><summary>{_e(summary)}</summary><dl>{cells}</dl></details>"
