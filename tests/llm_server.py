"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, for tests and demos.

It answers famfind's two request kinds deterministically, from the prompt alone:

- ``feature_label``: the most common token marked ``<<...>>`` in the prompt, X, gives
  ``{"label": "tokens like 'X'", "description": ...}`` (a crude but real explainer);
- ``detection``: true for each numbered excerpt that contains X.

Faults are scripted: ``faults`` is a list consumed by successive requests (``"429"``,
``"500"``, ``"slow"``, ``"malformed"``, or ``None`` for a normal reply); ``rules`` maps a
prompt substring to such a list, consumed by requests whose prompt contains it. 429 and
500 carry ``retry-after-ms`` so the client's backoff stays short in tests.

Run standalone: ``python tests/llm_server.py --port 8765 [--faults 429,500,slow]``.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ScriptedLLM:
    def __init__(self, faults=(), rules=None, slow_seconds: float = 2.0, port: int = 0):
        self.faults = list(faults)
        self.rules = {k: list(v) for k, v in (rules or {}).items()}
        self.slow_seconds = slow_seconds
        self.requests: list[dict] = []  # every request received (incl. retried ones)
        self.statuses = Counter()
        self.lock = threading.Lock()
        self.inflight = self.max_inflight = 0  # concurrent requests being answered
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                n = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(n))
                with owner.lock:
                    owner.inflight += 1
                    owner.max_inflight = max(owner.max_inflight, owner.inflight)
                try:
                    code, payload, headers = owner.respond(self.path, body)
                finally:
                    with owner.lock:
                        owner.inflight -= 1
                data = json.dumps(payload).encode()
                try:
                    self.send_response(code)
                    for k, v in {"content-type": "application/json", **headers}.items():
                        self.send_header(k, v)
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def _fault(self, prompt: str):
        with self.lock:
            for sub, lst in self.rules.items():
                if sub in prompt and lst:
                    return lst.pop(0)
            return self.faults.pop(0) if self.faults else None

    def respond(self, path: str, body: dict):
        prompt = "\n".join(m.get("content", "") for m in body.get("messages", []))
        kind = body.get("response_format", {}).get("json_schema", {}).get("name", "")
        with self.lock:
            self.requests.append({"path": path, "kind": kind, "prompt": prompt})
        fault = self._fault(prompt)
        if not path.endswith("/chat/completions"):
            return 404, {"error": {"message": f"no route {path}"}}, {}
        if fault == "429":
            self.statuses["429"] += 1
            return 429, {"error": {"message": "rate limited", "type": "rate_limit"}}, {"retry-after-ms": "5"}
        if fault == "500":
            self.statuses["500"] += 1
            return 500, {"error": {"message": "internal error"}}, {"retry-after-ms": "5"}
        if fault == "slow":
            self.statuses["slow"] += 1
            time.sleep(self.slow_seconds)
        if fault == "malformed":
            self.statuses["malformed"] += 1
            content = "Sure! The label is: induction-ish things"
        elif kind == "feature_label":
            marked = Counter(t.strip() for t in re.findall(r"<<(.*?)>>", prompt) if t.strip())
            x = marked.most_common(1)[0][0] if marked else "?"
            content = json.dumps({"label": f"tokens like '{x}'",
                                  "description": f"Fires on the token '{x}' and its contexts."})
        elif kind == "detection":
            m = re.search(r"label: tokens like '(.*)'", prompt)
            x = m.group(1) if m else "\0"
            items = re.findall(r"^\d+\. (.*)$", prompt.split("\n\n", 2)[-1], flags=re.M)
            content = json.dumps({"answers": [x in it for it in items]})
        else:
            content = "{}"
        self.statuses["ok"] += 1
        return 200, {"id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
                     "model": body.get("model", "scripted"),
                     "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                  "message": {"role": "assistant", "content": content}}],
                     "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": len(content) // 4,
                               "total_tokens": (len(prompt) + len(content)) // 4}}, {}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--faults", default="", help="comma-separated: 429,500,slow,malformed,ok")
    ap.add_argument("--slow-seconds", type=float, default=2.0)
    a = ap.parse_args()
    faults = [None if f == "ok" else f for f in a.faults.split(",") if f]
    with ScriptedLLM(faults, slow_seconds=a.slow_seconds, port=a.port) as srv:
        print(f"scripted LLM server on {srv.base_url}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
