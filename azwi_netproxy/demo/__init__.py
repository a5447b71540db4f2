"""`azwi-netproxy-demo`: the whole flow in a throwaway sandbox of network namespaces.

As root on any Linux machine, with no Azure: builds a pod sandbox (sandbox.py), starts a
stand-in metadata service and a stand-in token service (standins.py: NOT Entra), runs the
real init and the real proxy, asks for tokens with curl and with the Azure SDK for Python
from inside the pod as an unprivileged uid, shows that with the proxy down nothing reaches
the metadata address, and removes everything, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from azwi_netproxy.demo.sandbox import METADATA_IP, Processes, Topology, processes, run_in, topology

TENANT: Final = "00000000-0000-4000-8000-000000000001"
APP_CLIENT: Final = "11111111-1111-4111-8111-111111111111"
REPORTS_CLIENT: Final = "22222222-2222-4222-8222-222222222222"
REPORTS_RESOURCE_ID: Final = (
    "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/demo/providers/"
    "Microsoft.ManagedIdentity/userAssignedIdentities/reports"
)
PROXY_UID: Final = 1501
APP_UID: Final = 1000
PROXY_PORT: Final = 8000
TOKEN_URL: Final = (
    f"http://{METADATA_IP}/metadata/identity/oauth2/token"
    "?api-version=2018-02-01&resource=https://management.azure.com/"
)
# A service account token as the kubelet projects it (unsigned here: the stand-in only checks its shape).
SA_TOKEN: Final = (
    "eyJhbGciOiJSUzI1NiIsImtpZCI6ImRlbW8ifQ."
    "eyJhdWQiOlsiYXBpOi8vQXp1cmVBRFRva2VuRXhjaGFuZ2UiXSwiaXNzIjoiaHR0cHM6Ly9kZW1vLmlzc3VlciIsInN1YiI6InN5c3RlbTpzZXJ2aWNlYWNjb3VudDpkZW1vOmFwcCJ9."
    "c2lnbmF0dXJl"
)
SDK_SCRIPT: Final = """
import sys
from azure.identity import ManagedIdentityCredential
kwargs = {"client_id": sys.argv[1]} if len(sys.argv) > 1 else {}
token = ManagedIdentityCredential(**kwargs).get_token("https://management.azure.com/.default")
print(token.token)
"""


class Demo:
    def __init__(self, *, verbose: bool) -> None:
        self.verbose = verbose
        self.failures: list[str] = []
        self.started = time.monotonic()

    def step(self, started: float, text: str) -> None:
        print(f"[{(time.monotonic() - started) * 1000:7.0f} ms] {text}", flush=True)

    def detail(self, text: str) -> None:
        for line in text.rstrip().splitlines():
            print(f"             {line}", flush=True)

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)
            print(f"             !! unexpected: {what}", flush=True)


def _make_certificates(directory: Path, sts_address: str) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for the stand-in token service's address."""
    ca_key, ca_pem = directory / "ca.key", directory / "ca.pem"
    key, csr, pem = directory / "sts.key", directory / "sts.csr", directory / "sts.pem"
    ext = directory / "sts.ext"
    ext.write_text(
        f"subjectAltName=IP:{sts_address}\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    commands = [
        [
            "openssl",
            "req",
            "-x509",
            *ec,
            "-keyout",
            str(ca_key),
            "-out",
            str(ca_pem),
            "-days",
            "1",
            "-subj",
            "/CN=azwi-netproxy demo CA (stand-in, not Entra)",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
        ["openssl", "req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=stand-in-sts"],
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(ca_pem),
            "-CAkey",
            str(ca_key),
            "-CAcreateserial",
            "-out",
            str(pem),
            "-days",
            "1",
            "-extfile",
            str(ext),
        ],
    ]
    for command in commands:
        subprocess.run(command, check=True, capture_output=True)
    ca_pem.chmod(0o644)
    return ca_pem, pem, key


@contextmanager
def _workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="azwi-demo-"))
    path.chmod(0o755)  # the proxy (uid 1501) reads the token file and the CA from here
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _curl(topo: Topology, url: str, *, uid: int = APP_UID) -> tuple[int, str]:
    done = run_in(
        topo.pod,
        ["curl", "-sS", "--max-time", "5", "-H", "Metadata: true", "-w", "\n%{http_code}", url],
        uid=uid,
    )
    if done.returncode != 0:
        return 0, (done.stderr.strip() or f"curl exit {done.returncode}")
    body, _, code = done.stdout.rpartition("\n")
    return int(code or 0), body


def _short(body: str) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return body[:200]
    if isinstance(doc, dict) and "access_token" in doc:
        doc["access_token"] = str(doc["access_token"])[:40] + "…"
    return json.dumps(doc)


def _token_client(token: str) -> str:
    import base64

    payload = token.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["appid"])


def run(demo: Demo) -> int:
    python = sys.executable
    print(
        "azwi-netproxy demo: a pod in network namespaces, a stand-in metadata service and a\n"
        "stand-in token service (NOT Entra; it issues fake tokens). No Azure, no cluster.\n"
    )
    started = time.monotonic()
    with _workdir() as work, topology() as topo, processes() as procs:
        demo.step(
            started,
            f"sandbox: namespaces {topo.pod} (pod), {topo.imds} (metadata service at "
            f"{METADATA_IP}), {topo.sts} (token service at {topo.sts_addr}); veth pairs only, "
            "nothing linked to this machine's network",
        )
        _run_demo(demo, topo, procs, work, python)
    demo.step(started, "cleanup: namespaces, rules and processes removed")
    if demo.failures:
        print(f"\ndemo: {len(demo.failures)} step(s) did not behave as expected:", file=sys.stderr)
        for failure in demo.failures:
            print(f"  - {failure}", file=sys.stderr)
        return 1
    print("\ndemo: every step behaved as expected")
    return 0


def _run_demo(demo: Demo, topo: Topology, procs: Processes, work: Path, python: str) -> None:
    t = time.monotonic()
    imds = procs.start(
        topo.imds,
        [python, "-m", "azwi_netproxy.demo.standins", "imds", METADATA_IP, "80"],
        ready_line="ready",
    )
    demo.step(t, f"stand-in metadata service listening on {METADATA_IP}:80; it prints every request")

    t = time.monotonic()
    ca, cert, key = _make_certificates(work, topo.sts_addr)
    sts = procs.start(
        topo.sts,
        [python, "-m", "azwi_netproxy.demo.standins", "sts", topo.sts_addr, "443", str(cert), str(key)],
        ready_line="ready",
    )
    demo.step(t, f"stand-in token service on https://{topo.sts_addr}/ with a throwaway CA")

    t = time.monotonic()
    init = run_in(
        topo.pod, [python, "-m", "azwi_netproxy.init"], env={**_base_env(), "PROXY_PORT": str(PROXY_PORT)}
    )
    demo.expect(
        init.returncode == 0, f"azwi-netproxy-init exited {init.returncode}: {init.stderr.strip()[-300:]}"
    )
    backend, rules = "?", ""
    for line in init.stderr.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        backend = entry.get("backend", backend)
        rules = entry.get("rules", rules)
    demo.step(t, f"init: azwi-netproxy-init in the pod as root installed its rules ({backend}):")
    demo.detail(str(rules))

    t = time.monotonic()
    token_file = work / "azure-identity-token"
    token_file.write_text(SA_TOKEN)
    token_file.chmod(0o644)
    identity_map = work / "identities.json"
    identity_map.write_text(
        json.dumps(
            {
                "identities": [
                    {"clientID": APP_CLIENT},
                    {"clientID": REPORTS_CLIENT, "resourceID": REPORTS_RESOURCE_ID},
                ]
            }
        )
    )
    identity_map.chmod(0o644)
    proxy_env = {
        **_base_env(),
        "AZURE_TENANT_ID": TENANT,
        "AZURE_CLIENT_ID": APP_CLIENT,
        "AZURE_FEDERATED_TOKEN_FILE": str(token_file),
        "AZURE_AUTHORITY_HOST": f"https://{topo.sts_addr}/",
        "SSL_CERT_FILE": str(ca),
        "AZWI_IDENTITY_MAP": str(identity_map),
    }
    proxy = procs.start(
        topo.pod, [python, "-m", "azwi_netproxy", f"--proxy-port={PROXY_PORT}"], uid=PROXY_UID, env=proxy_env
    )
    probe = run_in(
        topo.pod,
        [python, "-m", "azwi_netproxy", f"--proxy-port={PROXY_PORT}", "--probe"],
        uid=PROXY_UID,
        env=_base_env(),
    )
    demo.expect(probe.returncode == 0, f"proxy did not become ready: {probe.stderr.strip()}")
    demo.step(
        t,
        f"proxy: azwi-netproxy as uid {PROXY_UID} ready on 127.0.0.1:{PROXY_PORT} "
        "(the webhook's postStart probe, /proxy --probe, returned 0)",
    )

    t = time.monotonic()
    status, body = _curl(topo, TOKEN_URL)
    demo.step(t, f"curl as uid {APP_UID}: GET {TOKEN_URL} -> {status} (a miss: one exchange)")
    demo.detail(_short(body))
    demo.expect(status == 200 and APP_CLIENT in body, "curl did not get the default identity's token")

    t = time.monotonic()
    status, body = _curl(topo, TOKEN_URL)
    demo.step(t, f"curl again: {status} from the proxy's cache, no exchange")
    demo.expect(status == 200, "second curl failed")

    t = time.monotonic()
    status, body = _curl(topo, f"{TOKEN_URL}&msi_res_id={REPORTS_RESOURCE_ID}")
    demo.step(
        t, f"curl with msi_res_id=…/reports (pod identity style): {status}, resolved through the identity map"
    )
    demo.expect(
        status == 200 and REPORTS_CLIENT in body, "msi_res_id did not resolve to the reports identity"
    )

    t = time.monotonic()
    sdk = run_in(topo.pod, [python, "-c", SDK_SCRIPT], uid=APP_UID, env=_base_env(), timeout=60)
    if sdk.returncode == 0:
        client = _token_client(sdk.stdout.strip())
        demo.step(
            t,
            f"Azure SDK for Python (ManagedIdentityCredential, no endpoint override) as uid "
            f"{APP_UID}: token for client {client}",
        )
        demo.expect(client == APP_CLIENT, "the SDK got another identity's token")
        t = time.monotonic()
        sdk = run_in(
            topo.pod, [python, "-c", SDK_SCRIPT, REPORTS_CLIENT], uid=APP_UID, env=_base_env(), timeout=60
        )
        client = _token_client(sdk.stdout.strip()) if sdk.returncode == 0 else "none"
        demo.step(t, f"the same with client_id={REPORTS_CLIENT}: token for client {client}")
        demo.expect(client == REPORTS_CLIENT, "the SDK did not get the second identity's token")
    elif "No module named 'azure" in sdk.stderr:
        demo.step(
            t, "Azure SDK for Python: azure-identity is not installed here (scripts/demo.sh installs it)"
        )
    else:
        demo.expect(False, f"the Azure SDK failed: {sdk.stderr.strip()[-400:]}")

    t = time.monotonic()
    status, body = _curl(topo, f"http://{METADATA_IP}/metadata/instance?api-version=2021-02-01")
    demo.step(
        t,
        f"pass-through: GET /metadata/instance -> {status} from the stand-in metadata service, "
        f"fetched by the proxy as uid {PROXY_UID} (exempt from the redirect)",
    )
    demo.detail(body[:200])

    t = time.monotonic()
    _, proxy_log = procs.stop(proxy)
    status, body = _curl(topo, TOKEN_URL)
    demo.step(t, f"proxy stopped; curl as uid {APP_UID} -> {'refused: ' + body if status == 0 else status}")
    demo.expect(status == 0, "with the proxy down, the request got an answer")
    status, body = _curl(topo, f"http://{METADATA_IP}:8080/")
    demo.step(
        t,
        f"uid {APP_UID} to {METADATA_IP}:8080 (another port) -> "
        f"{'rejected: ' + body if status == 0 else status}",
    )
    demo.expect(status == 0, "another port of the metadata address was reachable")

    imds_out, _ = procs.stop(imds)
    sts_out, _ = procs.stop(sts)
    seen = [line for line in imds_out.splitlines() if line.startswith("stand-in IMDS:")]
    token_requests = [line for line in seen if "/metadata/identity" in line]
    demo.step(
        t,
        f"the stand-in metadata service saw {len(seen)} request(s), "
        f"{len(token_requests)} of them for a token:",
    )
    demo.detail("\n".join(seen) or "(none)")
    demo.expect(not token_requests, "a token request reached the node's metadata service")
    exchanges = [line for line in sts_out.splitlines() if "exchange #" in line]
    demo.step(t, f"the stand-in token service made {len(exchanges)} exchange(s):")
    demo.detail("\n".join(exchanges))
    if demo.verbose:
        demo.step(t, "the proxy's log:")
        demo.detail(proxy_log)


def _base_env() -> dict[str, str]:
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/tmp",  # noqa: S108 - clients need some HOME; they write nothing there
        "NO_PROXY": "*",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="azwi-netproxy-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--verbose", action="store_true", help="also print the proxy's log")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("azwi-netproxy-demo: run as root (it creates network namespaces)", file=sys.stderr)
        return 2
    missing = [tool for tool in ("ip", "curl", "openssl", "setpriv") if shutil.which(tool) is None]
    if missing:
        print(
            f"azwi-netproxy-demo: missing {', '.join(missing)} (scripts/demo.sh installs them)",
            file=sys.stderr,
        )
        return 2
    try:
        return run(Demo(verbose=args.verbose))
    except KeyboardInterrupt:
        print("\ndemo: interrupted; everything it made was removed", file=sys.stderr)
        return 130
