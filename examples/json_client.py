"""A small client for `cached-prompts stdio-json-repl`, the JSON service on stdin/stdout.

It starts the service as a child process (with the same Python interpreter, so it works
from a virtualenv without activating it), sends one request line per call and reads the
one response line that belongs to it.

    from json_client import CachedPromptsClient

    with CachedPromptsClient("path/to/workspace") as client:
        answers = client.single_prompt("dictionary", prelude_text, "river\\n",
                                       number_of_random_outputs=3,
                                       inference_parameters={"max_tokens": 40, "seed": 7})

Run `python examples/json_client.py [WORKSPACE]` for a demo.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import IO, Any


class ServiceError(Exception):
    """The service answered a request with a SystemError response."""


class CachedPromptsClient:
    """One running `stdio-json-repl` process; not thread-safe (one request at a time)."""

    def __init__(self, root: str | Path = ".", *options: str, stderr: IO[bytes] | int | None = None) -> None:
        """Start the service on workspace `root`; `options` are global flags such as
        `--lp-n-ctx 2048` or `-q`; the service's log goes to `stderr` (default: ours)."""
        command = [sys.executable, "-m", "cached_prompts.cli.main", "--root", str(root), *options,
                   "stdio-json-repl"]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
        self._ids = itertools.count(1)
        self._in: IO[bytes] = self.process.stdin  # type: ignore[assignment]  # PIPE: never None
        self._out: IO[bytes] = self.process.stdout  # type: ignore[assignment]

    # ----- protocol ----------------------------------------------------------------------

    def send_line(self, line: str | bytes) -> dict[str, Any]:
        """Send one raw line (no newline in it) and return the parsed response."""
        data = line.encode("utf-8") if isinstance(line, str) else line
        self._in.write(data + b"\n")
        self._in.flush()
        answer = self._out.readline()
        if not answer:
            raise ServiceError(f"the service ended (exit status {self.process.wait()}) without answering")
        return json.loads(answer)

    def request(self, command: str, **arguments: Any) -> Any:
        """Send a command and return its value; raise ServiceError on a SystemError response."""
        request_id = next(self._ids)
        line = json.dumps({"id": request_id, "command": command, "arguments": arguments}, ensure_ascii=False)
        response = self.send_line(line)
        if response.get("id") != request_id:
            raise ServiceError(f"response to request {request_id} carries id {response.get('id')!r}")
        if response["status"] != "Ok":
            raise ServiceError(response["message"])
        return response["value"]

    # ----- commands ----------------------------------------------------------------------

    def single_prompt(self, prelude_id: str, prelude: str, prompt: str, **arguments: Any) -> list[str]:
        """Outputs for prelude + prompt. Optional: number_of_random_outputs (default 1),
        add_nonrandom_output_to_front (a greedy answer first), inference_parameters."""
        return self.request("single_prompt", prelude_id=prelude_id, prelude=prelude, prompt=prompt, **arguments)

    def count_tokens(self, text: str, as_prelude: bool = False) -> int:
        return self.request("count_tokens", text=text, as_prelude=as_prelude)

    def precache(self, prelude_id: str, prelude: str) -> dict[str, Any]:
        return self.request("precache", prelude_id=prelude_id, prelude=prelude)

    def list_preludes(self) -> list[dict[str, Any]]:
        return self.request("list_preludes")

    def drop_prelude(self, prelude_id: str) -> int:
        return self.request("drop_prelude", prelude_id=prelude_id)

    def info(self) -> dict[str, Any]:
        return self.request("info")

    def close(self, timeout: float = 30.0) -> int:
        """Ask the service to stop and return its exit status."""
        if self.process.poll() is None:
            try:
                self.request("shutdown")
            except (ServiceError, BrokenPipeError):
                pass  # already gone; wait() reports how it ended
            self._in.close()
        status = self.process.wait(timeout)
        self._out.close()
        return status

    def __enter__(self) -> "CachedPromptsClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def demo(root: str) -> None:
    prelude = ("<|im_start|>system\nYou are a concise dictionary. For each word, reply with one sentence "
               "that defines it.<|im_end|>\n<|im_start|>user\n")
    with CachedPromptsClient(root, "-q") as client:
        info = client.info()
        print(f"model {info['model_path']}, context {info['context_length']} tokens")
        print("prelude tokens:", client.count_tokens(prelude, as_prelude=True))
        print("precache:", client.precache("demo-dictionary", prelude))
        answers = client.single_prompt("demo-dictionary", prelude, "river<|im_end|>\n<|im_start|>assistant\n",
                                       number_of_random_outputs=2, add_nonrandom_output_to_front=True,
                                       inference_parameters={"max_tokens": 30, "stop": ["\n"]})
        for number, answer in enumerate(answers):
            print(f"answer {number}: {answer!r}")
        print("cached preludes:", client.list_preludes())
        try:
            client.request("single_prompt", prelude_id="../escape", prelude="x", prompt="y")
        except ServiceError as error:
            print("refused as expected:", error)


if __name__ == "__main__":
    demo(sys.argv[1] if len(sys.argv) > 1 else ".")
