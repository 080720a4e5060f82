"""A reward server for `reward.source: http` (docs/labeling.md, "Rewards beyond a judge"):
POST / with {"prompts": [...], "responses": [...], "references": [...], "fields": [...]}
answers {"rewards": [...]}, one float per response. It scores with examples/rewards.py's
within_word_budget; put your reward model behind the same schema.

    python examples/reward_server.py --port 9000      # binds 127.0.0.1
"""
import argparse
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rewards import within_word_budget  # noqa: E402


class RewardHandler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - the http.server interface
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            rewards = within_word_budget(body["prompts"], body["responses"], body["references"], body["fields"])
            self._answer(200, {"rewards": rewards})
        except (ValueError, KeyError, TypeError) as e:
            self._answer(400, {"error": f"{type(e).__name__}: {e}"})

    def _answer(self, status: int, data: dict) -> None:
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):  # quiet: one line per request is noise at RL rates
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    a = p.parse_args()
    server = ThreadingHTTPServer((a.host, a.port), RewardHandler)
    print(f"reward server on http://{a.host}:{server.server_port}/", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
