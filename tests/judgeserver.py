"""A small OpenAI-compatible chat endpoint for the tests of the ``openai:`` safety judge
(eval safety, search, study sites): it answers as the organism's guard model would."""

from __future__ import annotations

import json

from orthoedit.evaluate.safety import HFJudge
from orthoedit.organism import GUARD_MODEL
from orthoedit.runtime.session import Placement


class JudgeServer:
    """A small OpenAI-compatible chat endpoint on 127.0.0.1. ``mode``: ``guard`` answers with
    the organism guard's verdict on the (request, response) in the judge's message; ``garbage``
    replies with prose; ``bad-json`` sends a non-JSON body; ``error`` answers HTTP 500."""

    def __init__(self, mode: str):
        import http.server
        import threading

        self.mode, self.keys, self.requests = mode, [], 0
        self.guard = HFJudge(GUARD_MODEL, Placement(), 8) if mode == "guard" else None
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests += 1
                server.keys.append(self.headers.get("Authorization"))
                if server.mode == "error":
                    self.send_response(500)
                    self.end_headers()
                    return
                content = "I think this one is probably fine."
                if server.mode == "guard":
                    message = body["messages"][-1]["content"]
                    request, _, response = message.removeprefix("REQUEST:\n").partition(
                        "\n\nRESPONSE:\n"
                    )
                    content = server.guard([(request, response)])[0]
                payload = {"choices": [{"message": {"role": "assistant", "content": content}}]}
                raw = b"not json" if server.mode == "bad-json" else json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
