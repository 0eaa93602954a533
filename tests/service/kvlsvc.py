"""Helpers for the kvloomd tests: start the real daemon on loopback, talk HTTP to it, and check every
JSON response against docs/openapi.yaml.

Needs PyYAML and jsonschema (Debian: python3-yaml, python3-jsonschema; tools/dev.sh installs them).
"""
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time


def _schema_libs():
    """PyYAML and jsonschema, imported when a response is first validated (the load test needs
    neither). A missing dependency is a failure, not a skip."""
    try:
        import jsonschema
        import yaml
    except ImportError as e:
        sys.exit(f"service tests need PyYAML and jsonschema (apt-get install python3-yaml python3-jsonschema): {e}")
    return jsonschema, yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Spec:
    """docs/openapi.yaml: validates a (path template, method, status, body) against the contract."""

    def __init__(self, path=os.path.join(ROOT, "docs", "openapi.yaml")):
        jsonschema, yaml = _schema_libs()
        self.jsonschema = jsonschema
        with open(path) as f:
            self.doc = yaml.safe_load(f)
        self.templates = []
        for tpl in self.doc["paths"]:
            rx = "^" + re.sub(r"\{[^}]+\}", "[^/]+", tpl) + "$"
            self.templates.append((re.compile(rx), tpl))
        self.checked = 0

    def _resolve(self, obj):
        while "$ref" in obj:
            node = self.doc
            for part in obj["$ref"].lstrip("#/").split("/"):
                node = node[part]
            obj = node
        return obj

    def schema_validator(self, name):
        return self.jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}",
                                                "components": self.doc["components"]})

    def validate(self, method, url, status, ctype, body):
        path = url.split("?")[0]
        tpl = next((t for rx, t in self.templates if rx.match(path)), None)
        if tpl is None:
            assert status == 404, f"{method} {path}: not in the contract but answered {status}"
            tpl = None
        if tpl is None:
            op_responses = {"404": self.doc["components"]["responses"]["Error"]}
        else:
            ops = self.doc["paths"][tpl]
            op = ops.get(method.lower())
            if op is None:
                assert status == 405, f"{method} {tpl}: no such operation but answered {status}"
                op_responses = {"405": self.doc["components"]["responses"]["Error"]}
            else:
                op_responses = op["responses"]
        resp = op_responses.get(str(status))
        if resp is None and status == 404:  # every path exists on one listener only; elsewhere 404
            resp = self.doc["components"]["responses"]["Error"]
        assert resp is not None, f"{method} {path}: status {status} is not in the contract ({sorted(op_responses)})"
        resp = self._resolve(resp)
        content = resp.get("content", {})
        base = (ctype or "").split(";")[0].strip()
        assert base in content, f"{method} {path} {status}: content type {ctype!r} not in {list(content)}"
        if base == "application/json":
            schema = content[base]["schema"]
            v = self.jsonschema.Draft202012Validator({**schema, "components": self.doc["components"]})
            errs = sorted(v.iter_errors(json.loads(body)), key=lambda e: list(e.path))
            assert not errs, f"{method} {path} {status}: response violates the contract: {errs[0].message} " \
                             f"at {list(errs[0].path)}; body {body[:300]!r}"
        self.checked += 1


SPEC = None


def spec():
    global SPEC
    if SPEC is None:
        SPEC = Spec()
    return SPEC


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<{self.status} {self.body[:200]!r}>"


# Load-controller costs pinned so that every cached chunk is loaded (a 1 tokens/s prefill): the
# tests of hits, bytes read and cached tokens stay deterministic whatever the machine measures.
# Tests of the controller itself pass load_costs=None (measured costs) or their own.
LOAD_EVERY_HIT = "read_gbps=1000,decode_gbps=1000,prefill_tok_s=1"


class Daemon:
    """The real kvloomd on loopback with random free ports."""

    def __init__(self, binary, model, store, auth=None, extra=(), ready_timeout=60, load_costs=LOAD_EVERY_HIT):
        self.binary, self.model, self.store, self.auth = binary, model, store, auth
        self.extra = list(extra)
        if load_costs and "--load-controller" not in self.extra:
            self.extra += ["--load-costs", load_costs]
        self.ready_timeout = ready_timeout
        self.proc = None

    def start(self):
        self.port, self.admin_port = free_port(), free_port()
        args = [self.binary, "--model", self.model, "--store", self.store,
                "--listen", f"127.0.0.1:{self.port}", "--admin-listen", f"127.0.0.1:{self.admin_port}"]
        if self.auth:
            args += ["--auth", self.auth]
        # small segment files: tests run many daemons at once on a shared disk
        args += ["--store-segment-mb", "16", "--store-capacity-mb", "64"]
        args += self.extra
        self.stderr_path = os.path.join(self.store + ".stderr")
        self.errf = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.errf, text=True)
        box = {}

        def read_ready():
            box["line"] = self.proc.stdout.readline()
        t = threading.Thread(target=read_ready, daemon=True)
        t.start()
        t.join(self.ready_timeout)
        line = box.get("line", "")
        if "ready" not in line:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"kvloomd did not become ready: {line!r}; stderr: {self.stderr()}")
        self.ready_line = line
        return self

    def stderr(self):
        if not self.errf.closed:
            self.errf.flush()
        with open(self.stderr_path, "rb") as f:
            return f.read().decode(errors="replace")[-4000:]

    def stop(self, timeout=60):
        """SIGTERM; the daemon must drain and exit 0 (under ASan: leak-free and no sanitizer report)."""
        if not self.proc:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("kvloomd did not exit within %ds of SIGTERM" % timeout)
        self.proc.stdout.close()
        self.errf.close()
        err = self.stderr()
        self.proc = None
        assert rc == 0, f"kvloomd exited {rc} after SIGTERM; stderr: {err}"
        assert "AddressSanitizer" not in err and "runtime error" not in err and "LeakSanitizer" not in err, err
        return rc

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def request(self, method, path, body=None, token=None, admin=False, ctype="application/json",
                headers=None, raw=None, validate=True, timeout=60):
        port = self.admin_port if admin else self.port
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        h = dict(headers or {})
        data = None
        if raw is not None:
            data = raw
        elif body is not None:
            data = json.dumps(body).encode()
        if data is not None and ctype is not None:
            h["Content-Type"] = ctype
        if token:
            h["Authorization"] = f"Bearer {token}"
        c.request(method, path, body=data, headers=h)
        r = c.getresponse()
        out = Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        c.close()
        if validate:
            spec().validate(method, path, out.status, out.headers.get("content-type"), out.body)
        if out.status >= 400:
            e = out.json()
            assert set(e) == {"error"} and "code" in e["error"] and "message" in e["error"], out
        return out


class Failures:
    def __init__(self):
        self.n = 0

    def check(self, cond, msg):
        if not cond:
            self.n += 1
            print("FAIL:", msg, flush=True)
        return cond
