"""Security checks, one test each (issue 14, item 6), against the shipped configuration and the
session's real TorchServe: management API on loopback, model registration off, `allowed_urls`
limited to the local store (ShellTorch), checkpoints loaded without pickle code execution, no
request field that makes the server fetch a URL or read a path, and no secret in any log.
"""

from __future__ import annotations

import ast
import base64
import http.server
import ipaddress
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.integration.torchserve import REPO, TorchServe, free_port

pytestmark = pytest.mark.server

SHIPPED_CONFIGS = sorted(p for p in REPO.glob("**/config.properties")
                         if ".venv" not in p.parts and "model_store" not in p.parts)


def properties(path: Path) -> dict[str, str]:
    """A .properties file's keys (Java unescapes '\\\\' to '\\')."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip().replace("\\\\", "\\")
    return out


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket in LISTEN state on `port` (from /proc/net/tcp{,6})."""
    found = set()
    for name, width in (("tcp", 8), ("tcp6", 32)):
        path = Path("/proc/net") / name
        if not path.is_file():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address_hex, port_hex = local.split(":")
            if int(port_hex, 16) != port or state != "0A":
                continue
            raw = bytes.fromhex(address_hex)
            if width == 8:
                found.add(str(ipaddress.IPv4Address(raw[::-1])))
            else:  # four little-endian 32-bit words
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                address = ipaddress.IPv6Address(words)
                found.add(str(address.ipv4_mapped or address))
    return found


# --- 1. management API on loopback ---------------------------------------------------------------
def test_shipped_configs_bind_the_management_api_to_loopback() -> None:
    assert SHIPPED_CONFIGS, "no config.properties found"
    for path in SHIPPED_CONFIGS:
        address = properties(path)["management_address"]
        host = re.match(r"https?://\[?([^\]/:]+)", address).group(1)
        assert ipaddress.ip_address(host).is_loopback, f"{path}: management_address={address}"


def test_live_management_api_listens_on_loopback_only(server: TorchServe) -> None:
    addresses = listening_addresses(server.management_port)
    assert addresses, "management port not listening"
    assert all(ipaddress.ip_address(a).is_loopback for a in addresses), addresses


# --- 2. model registration off ---------------------------------------------------------------------
def test_shipped_configs_disable_the_model_api() -> None:
    for path in SHIPPED_CONFIGS:
        assert properties(path).get("enable_model_api", "false") == "false", path


def test_live_server_refuses_to_register_or_unregister_models(server: TorchServe, model_store: Path) -> None:
    management = f"http://127.0.0.1:{server.management_port}"
    headers = {"Authorization": f"Bearer {server.keys['management']}"}  # even with the right key
    url = (model_store / f"{server.model}.mar").as_uri()
    register = requests.post(f"{management}/models", params={"url": url, "model_name": "intruder"},
                             headers=headers, timeout=30)
    assert register.status_code >= 400, register.text
    drop = requests.delete(f"{management}/models/{server.model}", headers=headers, timeout=30)
    assert drop.status_code >= 400, drop.text
    names = [m["modelName"] for m in requests.get(f"{management}/models", headers=headers, timeout=30).json()["models"]]
    assert names == [server.model]


# --- 3. allowed_urls limited to the local store ------------------------------------------------------
@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_allowed_urls_match_only_archives_of_the_local_store(path: Path) -> None:
    """TorchServe matches every pattern of `allowed_urls` against the whole URL (Java `matches`)."""
    patterns = [re.compile(p) for p in properties(path)["allowed_urls"].split(",")]

    def allowed(url: str) -> bool:
        return any(p.fullmatch(url) for p in patterns)

    store = "file:///models/" if "k8s" in path.parts else "file:///srv/clip-tta/model_store/"
    assert allowed(store + "clip.mar")
    for url in ("http://attacker.example/evil.mar", "https://attacker.example/model_store/evil.mar",
                "file:///etc/passwd", "file:///tmp/evil.mar", store + "sub/evil.mar",
                store + "../../tmp/evil.mar", store + "clip.mar?x=http://attacker.example/",
                "file:///srv/model_store/../../tmp/model_store/evil.mar", "ftp://h/model_store/e.mar"):
        assert not allowed(url), f"{path}: allowed_urls lets {url} through"


# --- 4. checkpoints: no pickle code execution --------------------------------------------------------
def _calls(tree: ast.AST, name: str) -> Iterator[ast.Call]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called == name:
                yield node


def test_every_torch_load_in_the_package_is_weights_only() -> None:
    checked = 0
    for path in sorted((REPO / "tta").rglob("*.py")) + sorted((REPO / "handlers").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for name in ("load", "create_model_and_transforms", "load_checkpoint"):
            for call in _calls(tree, name):
                if name == "load" and ast.unparse(call.func) != "torch.load":
                    continue
                keywords = {k.arg: k.value for k in call.keywords}
                pretrained = keywords.get("pretrained")
                if name == "create_model_and_transforms" and (
                        pretrained is None or (isinstance(pretrained, ast.Constant) and pretrained.value is None)
                        or "require_pretrained" in keywords):
                    continue  # random weights, or a hub tag resolved to safetensors/known files
                weights_only = keywords.get("weights_only")
                assert isinstance(weights_only, ast.Constant) and weights_only.value is True, \
                    f"{path.relative_to(REPO)}:{call.lineno}: {ast.unparse(call)[:80]} without weights_only=True"
                checked += 1
    assert checked >= 2  # the checkpoint loader and the state snapshots


class _Exploit:
    """Pickling this object makes unpickling call `Path.touch(marker)`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


def test_a_malicious_pickle_checkpoint_is_refused_without_running_its_code(tmp_path: Path) -> None:
    import torch

    from tta.errors import ModelUnavailable
    from tta.models import load_model

    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": _Exploit(marker)}}, checkpoint)
    with pytest.raises(ModelUnavailable):
        load_model(f"TTA-Tiny:{checkpoint}")
    assert not marker.exists(), "unpickling the checkpoint ran code"


# --- 5. no request field fetches a URL or reads a path ------------------------------------------------
@pytest.fixture()
def recorder() -> Iterator[tuple[str, list[str]]]:
    """A real HTTP server on a free loopback port that records every request it gets."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"\x89PNG fake")

        do_POST = do_HEAD = do_GET  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    finally:
        httpd.shutdown()
        httpd.server_close()


def _url_bodies(url: str, secret_path: str) -> list[dict]:
    png_b64 = base64.b64encode(b"not an image").decode()
    return [
        {"image": f"{url}/image.png"}, {"image": f"file://{secret_path}"}, {"image": secret_path},
        {"image": f"data:image/png;base64,{png_b64}", "labels": [f"{url}/label", secret_path]},
        {"image": png_b64, "method": f"{url}/method"}, {"image": png_b64, "labels": f"{url}/labels.txt"},
        {"image": png_b64, "labels_file": secret_path}, {"image": png_b64, "templates": f"{url}/t"},
        {"image": png_b64, "method": "tpt", "options": {"ctx_init": f"{url}/ctx"}},
        {"image": png_b64, "method": "rlcf", "options": {"reward_model": f"hf-hub:{url}/m"}},
        {"image": png_b64, "method": "rlcf", "options": {"reward_model": f"ViT-B-32:{secret_path}"}},
        {"image": png_b64, "method": "difftpt", "options": {"generator": f"{url}/pipeline"}},
        {"image": png_b64, "method": "difftpt", "options": {"generator": secret_path}},
        {"action": "import", "method": "tda", "state": f"file://{secret_path}"},
        {"action": "import", "method": "tda", "state": {"path": secret_path, "url": url}},
        {"action": "feedback", "method": "gda", "label": "cat", "image": f"{url}/x.png"},
        {"action": "export", "method": secret_path},
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [f"{url}/oip.png"]}]},
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [png_b64]}],
         "parameters": {"options": json.dumps({"reward_model": f"{url}/r"}), "method": "rlcf"}},
    ]


def test_no_request_field_fetches_a_url_or_reads_a_path(server: TorchServe, recorder, tmp_path: Path) -> None:
    url, hits = recorder
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT\n")
    headers = {**server.auth, "X-TTA-Admin-Token": "not-the-token"}
    for body in _url_bodies(url, str(secret)):
        reply = requests.post(server.predict_url, json=body, headers=headers, timeout=60)
        assert reply.status_code < 500, (body, reply.status_code, reply.text)
        assert "TOP-SECRET-CONTENT" not in reply.text
    raw = requests.post(server.predict_url, data=f"{url}/raw.png".encode(), headers=server.auth, timeout=60)
    assert 400 <= raw.status_code < 500
    assert hits == [], f"the server fetched {hits}"


# --- 6. secrets never in logs ------------------------------------------------------------------------
def test_no_key_appears_in_any_log(server: TorchServe, photos: dict[str, bytes]) -> None:
    """Make the server log requests carrying every credential (right and wrong), then scan every
    file it wrote outside the key file itself."""
    wrong = "wrong-token-0123456789abcdef"
    for headers in ({**server.auth, "X-TTA-Admin-Token": server.keys["management"]},
                    {**server.auth, "X-TTA-Admin-Token": wrong},
                    {"Authorization": f"Bearer {wrong}"}):
        requests.post(server.predict_url, json={"action": "reset", "method": "tda"}, headers=headers, timeout=60)
        requests.post(server.predict_url, data=photos["coffee"], headers=headers, timeout=60)
    secrets = {server.keys["inference"], server.keys["management"], wrong}
    scanned = 0
    for path in server.workdir.rglob("*"):
        if not path.is_file() or path.name == "key_file.json" or path.stat().st_size > 50_000_000:
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        scanned += 1
        for secret in secrets:
            assert secret not in text, f"a credential appears in {path.relative_to(server.workdir)}"
    assert scanned >= 2


def test_a_redis_password_never_reaches_logs_or_answers(tmp_path: Path, caplog) -> None:
    """The stream state behind an unreachable Redis with a password in its URL: every log line of
    building the worker, answering stream requests and state actions, and every answer, is free
    of the password (URLs are logged masked)."""
    import logging

    from tta.serving.admin import AdminAuth
    from tta.serving.service import build_service
    from tta.state import config as state_config

    password = "redis-pw-0123456789"
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    url = f"redis://:{password}@127.0.0.1:{free_port()}/0"
    caplog.set_level(logging.DEBUG)
    previous = state_config.current_config()
    try:
        service = build_service({"labels_file": "labels.txt", "model": "tiny-random", "state_url": url,
                                 "state_timeout_ms": 100}, model_name="m", model_dir=tmp_path,
                                admin=AdminAuth(token="t"))
        image = base64.b64encode(_png()).decode()
        bodies = [{"image": image, "method": "tda"}, {"action": "state", "method": "tda"},
                  {"action": "export", "method": "tda"}, {"action": "reset", "method": "tda"}]
        answers = [service.handle(json.dumps(b).encode(), {"content-type": "application/json",
                                                           "x-tta-admin-token": "t"}) for b in bodies]
    finally:
        state_config.configure(previous)
    assert all(a.status < 500 or a.status == 503 for a in answers), [(a.status, a.body) for a in answers]
    assert not any(password in a.text() for a in answers)
    assert "127.0.0.1" in caplog.text, "the backend was never logged: the check would prove nothing"
    assert password not in caplog.text


def _png() -> bytes:
    from tta.testing.hostile import encode, photo

    return encode(photo(32), "PNG")
