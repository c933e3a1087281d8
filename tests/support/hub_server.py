"""A local stand-in for the Hugging Face Hub: the endpoints huggingface_hub calls to create a repository and upload
a folder through the LFS protocol, on 127.0.0.1, so the real client code runs end to end.

Endpoints (as the Hub answers them):

* ``POST /api/repos/create``: ``{name, organization, visibility}`` -> ``{url}`` (409 with the url if it exists);
* ``POST /api/validate-yaml``: the card's front matter, refused with 400 when it is not YAML;
* ``POST /api/models/{repo}/preupload/{rev}``: upload mode per file (``lfs`` for weights, else ``regular``);
* ``POST /{repo}.git/info/lfs/objects/batch``: a basic-transfer upload action per object;
* ``PUT /lfs-upload/{oid}``: the object's bytes, refused unless their sha256 is the oid;
* ``POST /api/models/{repo}/commit/{rev}``: the NDJSON commit; regular files arrive base64-encoded, LFS files
  must have been uploaded before.

Every request must carry ``Authorization: Bearer <token>``; what the server received is kept in :class:`HubState`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import yaml

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")


@dataclass
class HubState:
    token: str
    user: str = "tester"
    repos: dict[str, dict] = field(default_factory=dict)  # repo id -> {"visibility": ..., "files": {path: bytes}}
    lfs_objects: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    commits: list[dict] = field(default_factory=list)


def _handler(state: HubState):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            return

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _reply(self, status: int, payload: dict | None = None) -> None:
            data = json.dumps(payload or {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") == f"Bearer {state.token}":
                return True
            self._reply(401, {"error": "Invalid credentials in Authorization header"})
            return False

        def _base(self) -> str:
            return f"http://{self.headers['Host']}"

        def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
            path = urlparse(self.path).path
            state.requests.append(("PUT", path))
            body = self._body()
            if path.startswith("/lfs-upload/"):
                oid = path.rsplit("/", 1)[1]
                if hashlib.sha256(body).hexdigest() != oid:
                    return self._reply(400, {"error": "sha256 mismatch"})
                state.lfs_objects[oid] = body
                return self._reply(200)
            self._reply(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            path = unquote(urlparse(self.path).path)
            state.requests.append(("POST", path))
            body = self._body()
            if not self._authorized():
                return None
            if path == "/api/repos/create":
                request = json.loads(body)
                repo_id = f"{request.get('organization') or state.user}/{request['name']}"
                url = f"{self._base()}/{repo_id}"
                if repo_id in state.repos:
                    return self._reply(409, {"error": "You already created this model repo", "url": url})
                state.repos[repo_id] = {"visibility": request.get("visibility", "public"), "files": {}}
                return self._reply(200, {"url": url, "name": repo_id})
            if path == "/api/validate-yaml":
                content = json.loads(body)["content"]
                try:
                    front = content.split("---", 2)[1] if content.startswith("---") else ""
                    yaml.safe_load(front)
                except yaml.YAMLError as error:
                    return self._reply(400, {"errors": [{"message": str(error)}]})
                return self._reply(200, {"errors": [], "warnings": []})
            if path.endswith(".git/info/lfs/objects/batch"):
                repo_id = path[1:].removesuffix(".git/info/lfs/objects/batch")
                if repo_id not in state.repos:
                    return self._reply(404, {"error": "Repository not found"})
                request = json.loads(body)
                objects = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                            "actions": {"upload": {"href": f"{self._base()}/lfs-upload/{o['oid']}"}}}
                           for o in request["objects"]]
                return self._reply(200, {"transfer": "basic", "objects": objects})
            if path.startswith("/api/models/") and "/preupload/" in path:
                repo_id = path.removeprefix("/api/models/").split("/preupload/")[0]
                if repo_id not in state.repos:
                    return self._reply(404, {"error": "Repository not found"})
                files = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                          "shouldIgnore": False} for f in json.loads(body)["files"]]
                return self._reply(200, {"files": files, "commitOid": "0" * 40})
            if path.startswith("/api/models/") and "/commit/" in path:
                repo_id = path.removeprefix("/api/models/").split("/commit/")[0]
                if repo_id not in state.repos:
                    return self._reply(404, {"error": "Repository not found"})
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                for line in lines[1:]:
                    value = line["value"]
                    if line["key"] == "file":
                        state.repos[repo_id]["files"][value["path"]] = base64.b64decode(value["content"])
                    elif line["key"] == "lfsFile":
                        if value["oid"] not in state.lfs_objects:
                            return self._reply(422, {"error": f"LFS object of {value['path']} was not uploaded"})
                        state.repos[repo_id]["files"][value["path"]] = state.lfs_objects[value["oid"]]
                state.commits.append({"repo": repo_id, "header": lines[0]["value"],
                                      "paths": [line["value"]["path"] for line in lines[1:]]})
                oid = hashlib.sha1(body).hexdigest()
                return self._reply(200, {"commitUrl": f"{self._base()}/{repo_id}/commit/{oid}", "commitOid": oid,
                                         "pullRequestUrl": None})
            return self._reply(404, {"error": f"no endpoint {path}"})

    return Handler


class LocalHub:
    """``with LocalHub(token) as hub:`` serves on ``hub.endpoint`` (127.0.0.1, a free port) until the block ends."""

    def __init__(self, token: str) -> None:
        self.state = HubState(token)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "LocalHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
