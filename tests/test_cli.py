"""The ``p2pimage`` command line: every subcommand's happy path and its main error.

Offline commands run through click's runner on the real entry point. ``fetch`` and
``status`` run as child processes (they start their own trio loop) against an in-process
local cluster: the real registry, sidecar, tracker and two node mirrors.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
import trio
from click.testing import CliRunner
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from daemons._http import serve_app
from daemons.cli import main
from daemons.cli.fetch import EXIT_STALLED, FetchFailed, fetch_failed
from daemons.testbed.localcluster import LocalCluster, local_cluster
from p2pimage.auth.tokens import NodeKey, SigningKey, TokenIssuer, TokenVerifier
from p2pimage.metainfo.torrent import Metainfo
from p2pimage.oci.image import build_image, push_image
from p2pimage.oci.registry import RegistryClient

MIB = 1024 * 1024


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    # No P2PIMAGE_* variable from the caller's environment leaks into the daemons' config.
    env = {k: None for k in os.environ if k.startswith("P2PIMAGE_")}
    result = runner.invoke(main, list(args), input=stdin, env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


# --- torrent ----------------------------------------------------------------------------


def test_torrent_create_inspect_and_garbage(runner: CliRunner, tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(100_000))
    out = tmp_path / "blob.torrent"
    code, stdout, _ = invoke(runner, "torrent", "create", str(blob), "-o", str(out))
    assert code == 0
    meta = Metainfo.from_bytes(out.read_bytes())
    assert stdout.strip() == meta.info_hash.hex()
    code, stdout, _ = invoke(runner, "torrent", "inspect", str(out), "--json")
    assert code == 0 and json.loads(stdout)["length"] == 100_000

    garbage = tmp_path / "garbage.torrent"
    garbage.write_bytes(b"not bencode")
    code, _, stderr = invoke(runner, "torrent", "inspect", str(garbage))
    assert code == 1
    assert one_line_error(stderr).startswith("Error: ")


def test_a_fetch_failure_keeps_its_exit_code(runner: CliRunner) -> None:
    # fetch's failures are click exceptions carrying the documented exit codes (3: stalled).
    @click.command()
    def stalls() -> None:
        raise fetch_failed("no byte for 15 s", EXIT_STALLED)

    result = runner.invoke(stalls, [])
    assert result.exit_code == EXIT_STALLED == 3
    assert one_line_error(result.stderr) == "Error: no byte for 15 s"
    for code in (1, 3, 130):
        failure = fetch_failed("x", code)
        assert isinstance(failure, FetchFailed) and failure.exit_code == code


# --- keys -------------------------------------------------------------------------------


def test_keys_generate_jwks_and_join_credential(runner: CliRunner, tmp_path: Path) -> None:
    pem = tmp_path / "key.pem"
    code, stdout, _ = invoke(runner, "keys", "generate", "-o", str(pem))
    assert code == 0
    key = SigningKey.from_pem(pem.read_bytes())
    assert stdout.strip() == key.kid
    assert pem.stat().st_mode & 0o777 == 0o600

    code, stdout, _ = invoke(runner, "keys", "jwks", str(pem))
    assert code == 0
    assert [k["kid"] for k in json.loads(stdout)["keys"]] == [key.kid]

    code, stdout, _ = invoke(runner, "keys", "join-credential", "--cluster", "prod")
    assert code == 0
    assert '"prod" = ["sha256$' in stdout

    # Main error: refuse to overwrite a key (losing it logs every node out).
    code, _, stderr = invoke(runner, "keys", "generate", "-o", str(pem))
    assert code == 1
    assert "exists" in one_line_error(stderr)
    assert SigningKey.from_pem(pem.read_bytes()).kid == key.kid


# --- token ------------------------------------------------------------------------------


@pytest.fixture
def token_files(tmp_path: Path) -> dict[str, Path]:
    signing = SigningKey.generate()
    node = NodeKey.generate()
    files = {
        "key": tmp_path / "sidecar.pem",
        "other_key": tmp_path / "other.pem",
        "node_key": tmp_path / "node.pem",
        "jwk": tmp_path / "node.jwk",
        "jwks": tmp_path / "jwks.json",
    }
    files["key"].write_bytes(signing.to_pem())
    files["other_key"].write_bytes(SigningKey.generate().to_pem())
    files["node_key"].write_bytes(node.to_pem())
    files["jwk"].write_text(json.dumps(node.public_jwk()))
    files["jwks"].write_text(json.dumps({"keys": [signing.public_jwk()]}))
    return files


def test_token_issue_then_inspect_verifies(runner: CliRunner, token_files: dict[str, Path]) -> None:
    code, stdout, _ = invoke(
        runner,
        "token",
        "issue",
        "--key",
        str(token_files["key"]),
        "--cluster",
        "prod",
        "--node",
        "node-1",
        "--node-key",
        str(token_files["node_key"]),
        "--zone",
        "eu-1a",
        "--lifetime",
        "120",
    )
    assert code == 0
    jwt = stdout.strip()
    jwks = json.loads(token_files["jwks"].read_text())
    from p2pimage.auth.tokens import KeySet

    claims = TokenVerifier(KeySet.from_jwks(jwks)).verify(jwt, now=time.time(), cluster="prod")
    assert (claims.subject, claims.zone, claims.issuer) == ("node-1", "eu-1a", "p2pimage-sidecar")
    assert claims.expires_at - claims.issued_at == 120
    node_jwk = json.loads(token_files["jwk"].read_text())
    assert claims.cnf_jwk == node_jwk

    code, stdout, _ = invoke(
        runner, "token", "inspect", jwt, "--jwks", str(token_files["jwks"]), "--json"
    )
    assert code == 0
    doc = json.loads(stdout)
    assert doc["header"]["alg"] == "EdDSA"
    assert doc["claims"]["cluster"] == "prod" and doc["claims"]["sub"] == "node-1"
    assert doc["verification"] == {"valid": True, "reason": None, "detail": None}

    # From stdin, pasted with its "Bearer " prefix, human output, decode only.
    code, stdout, _ = invoke(runner, "token", "inspect", "-", stdin=f"Bearer {jwt}\n")
    assert code == 0
    assert "node-1" in stdout and "verdict" not in stdout and "in 1" in stdout

    # Cluster check, as the tracker would make it.
    code, stdout, _ = invoke(
        runner,
        "token",
        "inspect",
        jwt,
        "--jwks",
        str(token_files["jwks"]),
        "--cluster",
        "staging",
    )
    assert code == 1
    assert "INVALID: wrong_cluster" in stdout


def test_token_inspect_reports_why_verification_fails(
    runner: CliRunner, token_files: dict[str, Path]
) -> None:
    # Signed by a key the JWKS does not hold (e.g. a rotated-out or foreign key).
    code, stdout, _ = invoke(
        runner,
        "token",
        "issue",
        "--key",
        str(token_files["other_key"]),
        "--cluster",
        "prod",
        "--node",
        "n",
        "--jwk-file",
        str(token_files["jwk"]),
    )
    assert code == 0
    code, stdout, _ = invoke(
        runner, "token", "inspect", stdout.strip(), "--jwks", str(token_files["jwks"]), "--json"
    )
    assert code == 1
    assert json.loads(stdout)["verification"]["reason"] == "unknown_kid"

    # Expired: issued by the library an hour ago.
    signing = SigningKey.from_pem(token_files["key"].read_bytes())
    old = TokenIssuer([signing], issuer="p2pimage-sidecar", lifetime_s=60).issue(
        subject="n",
        cluster="prod",
        node_jwk=json.loads(token_files["jwk"].read_text()),
        now=time.time() - 3600,
    )
    code, stdout, _ = invoke(runner, "token", "inspect", old, "--jwks", str(token_files["jwks"]))
    assert code == 1
    assert "INVALID: expired" in stdout

    # Not a JWT at all.
    code, _, stderr = invoke(runner, "token", "inspect", "hello.world")
    assert code == 1
    assert "malformed" in one_line_error(stderr)


def test_token_issue_usage_errors(runner: CliRunner, token_files: dict[str, Path]) -> None:
    base = ["token", "issue", "--key", str(token_files["key"]), "--cluster", "c", "--node", "n"]
    code, _, stderr = invoke(runner, *base)
    assert code == 2 and "exactly one of --jwk-file and --node-key" in stderr
    code, _, stderr = invoke(runner, *base, "--jwk-file", str(token_files["key"]))
    assert code == 1
    assert "not a JSON JWK" in one_line_error(stderr)


# --- daemons: --help, --print-config, a bad config file -------------------------------


def daemon_configs(tmp_path: Path) -> dict[str, str]:
    key = tmp_path / "sidecar.pem"
    key.write_bytes(SigningKey.generate().to_pem())
    return {
        "sidecar": (
            f"signing_keys = [{json.dumps(str(key))}]\n"
            'listen = "127.0.0.1:18090"\n'
            '[clusters]\nprod = ["sha256$' + "ab" * 32 + '"]\n'
        ),
        "tracker": 'sidecar_url = "http://127.0.0.1:8090"\ninterval_s = 20\n',
        "node": 'node_name = "node-7"\nlisten = "127.0.0.1:65009"\n',
    }


BAD = {
    "sidecar": ("token_lifetime_s", 'token_lifetime_s = "soon"\n'),
    "tracker": ("interval_s", 'sidecar_url = "http://127.0.0.1:8090"\ninterval_s = "x"\n'),
    "node": ("peer_port", 'peer_port = "x"\n'),
}


@pytest.mark.parametrize("daemon", ["sidecar", "tracker", "node"])
def test_daemon_help_print_config_and_bad_config(
    runner: CliRunner, tmp_path: Path, daemon: str
) -> None:
    code, stdout, _ = invoke(runner, daemon, "--help")
    assert code == 0 and "--print-config" in stdout and "--config" in stdout

    good = tmp_path / f"{daemon}.toml"
    good.write_text(daemon_configs(tmp_path)[daemon])
    code, stdout, _ = invoke(runner, daemon, "--config", str(good), "--print-config")
    assert code == 0
    printed = stdout
    if daemon == "sidecar":
        assert 'listen = "127.0.0.1:18090"' in printed
    elif daemon == "tracker":
        assert "interval_s = 20" in printed
    else:
        assert 'node_name = "node-7"' in printed
    # The printed configuration is itself a valid config file with the same effect.
    again = tmp_path / f"{daemon}-printed.toml"
    again.write_text(printed)
    code, reprinted, _ = invoke(runner, daemon, "--config", str(again), "--print-config")
    assert code == 0 and reprinted == printed

    key, text = BAD[daemon]
    bad = tmp_path / f"{daemon}-bad.toml"
    bad.write_text(text)
    code, _, stderr = invoke(runner, daemon, "--config", str(bad))
    assert code == 2
    line = one_line_error(stderr)
    assert line.startswith(f"p2pimage {daemon}: ") and f"'{key}'" in line


def test_sidecar_without_signing_keys_names_the_key(runner: CliRunner, tmp_path: Path) -> None:
    cfg = tmp_path / "sidecar.toml"
    cfg.write_text('[clusters]\nprod = ["sha256$' + "ab" * 32 + '"]\n')
    code, _, stderr = invoke(runner, "sidecar", "--config", str(cfg), "--print-config")
    assert code == 2 and "'signing_keys'" in one_line_error(stderr)


# --- cluster, containerd ----------------------------------------------------------------


def test_cluster_help_and_bad_option(runner: CliRunner) -> None:
    code, stdout, _ = invoke(runner, "cluster", "--help")
    assert code == 0 and "--nodes" in stdout
    code, _, stderr = invoke(runner, "cluster", "--nodes", "zero")
    assert code == 2 and "--nodes" in stderr


def test_containerd_configure_and_missing_registry(runner: CliRunner, tmp_path: Path) -> None:
    hosts = tmp_path / "certs.d"
    code, stdout, _ = invoke(
        runner,
        "containerd",
        "configure",
        "--mirror",
        "http://127.0.0.1:65001",
        "--hosts-dir",
        str(hosts),
        "registry.example.com",
    )
    assert code == 0
    written = Path(stdout.strip())
    assert written == hosts / "registry.example.com" / "hosts.toml"
    text = written.read_text()
    assert 'server = "https://registry.example.com"' in text
    assert '[host."http://127.0.0.1:65001"]' in text

    code, _, stderr = invoke(runner, "containerd", "configure", "--hosts-dir", str(hosts))
    assert code == 2 and "at least one registry" in stderr


# --- fetch and status against a live cluster --------------------------------------------


async def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PIMAGE_")}
    with trio.fail_after(timeout):
        return await trio.run_process(
            [sys.executable, "-m", "daemons.cli", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )


async def test_token_inspect_verifies_against_a_sidecar_jwks(
    token_files: dict[str, Path],
) -> None:
    signing = SigningKey.from_pem(token_files["key"].read_bytes())
    jwt = TokenIssuer([signing], issuer="p2pimage-sidecar").issue(
        subject="node-1", cluster="prod", node_jwk=NodeKey.generate().public_jwk(), now=time.time()
    )

    async def jwks(request: Request) -> JSONResponse:
        return JSONResponse({"keys": [signing.public_jwk()]})

    app = Starlette(routes=[Route("/.well-known/jwks.json", jwks)])
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_app, app, "127.0.0.1:0")
        proc = await cli("token", "inspect", jwt, "--sidecar", url, "--json")
        assert proc.returncode == 0, proc.stderr.decode()
        assert json.loads(proc.stdout)["verification"]["valid"] is True
        # Main errors: a URL that serves no JWKS, a sidecar that is not there (1).
        proc = await cli("token", "inspect", jwt, "--sidecar", url + "/elsewhere")
        assert proc.returncode == 1
        assert one_line_error(proc.stderr.decode()) == "Error: JWKS: HTTP 404"
        nursery.cancel_scope.cancel()
    proc = await cli("token", "inspect", jwt, "--sidecar", "http://127.0.0.1:9")
    assert proc.returncode == 1
    assert "unreachable" in one_line_error(proc.stderr.decode())


async def tracker_seeders(tracker_url: str) -> float:
    """Seeders the tracker knows, from its metrics."""
    import httpx

    from daemons.cli.status import parse_metrics

    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(tracker_url.removesuffix("/announce") + "/metrics")).text
    samples = parse_metrics(text).get("p2pimage_tracker_peers", [])
    return sum(value for labels, value in samples if labels.get("state") == "seeder")


def fetch_args(cluster: LocalCluster, credential_file: Path, name: str) -> list[str]:
    """``p2pimage fetch`` options joining ``cluster`` as node ``name`` (after the digest)."""
    return [
        "--repository",
        "demo/cli",
        "--sidecar",
        cluster.sidecar_url,
        "--tracker",
        cluster.tracker_url,
        "--credential-file",
        str(credential_file),
        "--peer-host",
        "127.0.0.1",
        "--node-name",
        name,
    ]


@pytest.mark.skipif(
    shutil.which("docker-registry") is None,
    reason="docker-registry (Debian package docker-registry) is not installed",
)
async def test_fetch_and_status_against_a_live_cluster(tmp_path: Path) -> None:
    image = build_image([3 * MIB, 300], seed=77)
    layer = image.layers[0]
    async with local_cluster(tmp_path / "cluster", nodes=2) as cluster:
        async with RegistryClient(cluster.registry.url) as client:
            await push_image(client, "demo/cli", "v1", image)
        # A node pulls it first, so the fetch below has a peer to get it from.
        import httpx

        async with httpx.AsyncClient(timeout=60) as http:
            r = await http.get(
                f"{cluster.nodes[0].mirror_url}/v2/demo/cli/blobs/{layer.digest}",
                params={"ns": cluster.registry_host},
            )
            assert r.status_code == 200 and r.content == layer.data
        cred = tmp_path / "join"
        cred.write_text(cluster.credential + "\n")
        common = fetch_args(cluster, cred, "fetch-test")
        out = tmp_path / "layer.bin"
        proc = await cli("fetch", layer.digest, *common, "-o", str(out))
        assert proc.returncode == 0, proc.stderr.decode()
        assert out.read_bytes() == layer.data
        summary = proc.stderr.decode()
        assert f"{layer.digest}: {len(layer.data)} bytes" in summary

        # To stdout, quietly: the bytes and nothing else.
        proc = await cli("fetch", layer.digest, *common, "-q")
        assert proc.returncode == 0, proc.stderr.decode()
        assert hashlib.sha256(proc.stdout).hexdigest() == layer.digest.removeprefix("sha256:")
        assert proc.stderr == b""

        # Main errors: a wrong join credential (1), a malformed digest (2).
        bad = tmp_path / "bad-join"
        bad.write_text(base64.urlsafe_b64encode(os.urandom(32)).decode())
        args = [a if a != str(cred) else str(bad) for a in common]
        proc = await cli("fetch", layer.digest, *args, "-o", str(tmp_path / "nope"))
        assert proc.returncode == 1
        line = one_line_error(proc.stderr.decode())
        assert line.startswith("Error: ") and "401" in line
        assert not (tmp_path / "nope").exists()
        proc = await cli("fetch", "sha256:xyz", *common)
        assert proc.returncode == 2

        # status of a node that served the layer through the swarm.
        node_url = cluster.nodes[0].mirror_url
        proc = await cli("status", "--node", node_url, "--json")
        assert proc.returncode == 0, proc.stderr.decode()
        report = json.loads(proc.stdout)
        assert report["kind"] == "node" and report["p2p"] is True
        assert report["swarms"] == 1
        assert report["served_bytes"]["swarm"] == len(layer.data)
        assert report["pulls"]["swarm"] == 1
        assert report["fallbacks"] == {}
        # Per layer (/swarms): complete here, every byte from the swarm or its origin range.
        (row,) = report["layers"]
        assert row["digest"] == layer.digest and row["size"] == len(layer.data)
        assert row["state"] in ("seeding", "released")
        assert row["have_bytes"] == len(layer.data) and row["pieces_have"] == row["pieces"]
        assert row["downloaded_from_peers"] + row["downloaded_from_origin"] == len(layer.data)
        assert row["uploaded"] >= len(layer.data)  # the fetch above read it from this node
        assert row["completed_in_s"] is not None and row["completed_in_s"] <= row["age_s"]
        proc = await cli("status", "--node", node_url)
        assert proc.returncode == 0
        text = proc.stdout.decode()
        assert "swarms" in text and "connected peers" in text and "3.0 MiB" in text
        assert layer.digest[:19] in text and "100% of 3.0 MiB" in text

        # status of the tracker: one swarm, announces counted.
        proc = await cli("status", "--tracker", cluster.tracker_url, "--json")
        assert proc.returncode == 0, proc.stderr.decode()
        report = json.loads(proc.stdout)
        assert report["kind"] == "tracker" and report["swarms"] == 1
        assert report["announces"]["ok"] >= 2
        assert report["seeders"] >= 1

        # Main errors: a daemon that is not there (1); a URL that is not a node (1);
        # neither --node nor --tracker (2).
        proc = await cli("status", "--node", "http://127.0.0.1:9", "--timeout", "2")
        assert proc.returncode == 1
        assert "unreachable" in one_line_error(proc.stderr.decode())
        proc = await cli("status", "--node", cluster.sidecar_url)
        assert proc.returncode == 1
        assert one_line_error(proc.stderr.decode()).startswith("Error: ")
        proc = await cli("status")
        assert proc.returncode == 2


@pytest.mark.skipif(
    shutil.which("docker-registry") is None,
    reason="docker-registry (Debian package docker-registry) is not installed",
)
async def test_fetch_resumes_from_its_work_dir_and_seeds(tmp_path: Path) -> None:
    """``--work-dir`` keeps verified pieces for the next run; ``--seed-for`` keeps the
    command serving the layer after its output is in place."""
    from p2pimage.storage.pieces import PieceStorage

    image = build_image([4 * MIB], seed=78)
    layer = image.layers[0]
    async with local_cluster(tmp_path / "cluster", nodes=0) as cluster:
        async with RegistryClient(cluster.registry.url) as client:
            await push_image(client, "demo/cli", "v1", image)
        import httpx

        from p2pimage.sidecar.client import SidecarClient, TokenKeeper

        async with httpx.AsyncClient(timeout=60) as http:
            # The sidecar serves torrents to cluster members (a token and its proof).
            sidecar = SidecarClient(cluster.sidecar_url, http=http)
            keeper = TokenKeeper(sidecar, node="tester", credential=cluster.credential)
            await keeper.refresh()
            meta = await sidecar.torrent(layer.digest, "demo/cli")
        cred = tmp_path / "join"
        cred.write_text(cluster.credential)

        def common(name: str, work: Path) -> list[str]:
            return [*fetch_args(cluster, cred, name), "--work-dir", str(work)]

        # An interrupted fetch left the first half of the pieces verified in its work dir.
        work_a = tmp_path / "work-a"
        half = meta.num_pieces // 2
        with PieceStorage.open(work_a, meta) as store:
            for index in range(half):
                offset = meta.piece_offset(index)
                store.write_piece(index, layer.data[offset : offset + meta.piece_size(index)])
        out_a = tmp_path / "a.bin"
        egress_before = cluster.registry_egress
        proc = await cli("fetch", layer.digest, *common("fetch-a", work_a), "-o", str(out_a))
        assert proc.returncode == 0, proc.stderr.decode()
        assert out_a.read_bytes() == layer.data
        resumed = half * meta.piece_length
        rest = len(layer.data) - resumed
        # Only the missing half came from the registry (the tracker made "a" the fetcher).
        summary = proc.stderr.decode()
        assert f"({resumed} from the work dir, 0 from peers, {rest} from the registry)" in summary
        assert cluster.registry_egress - egress_before <= rest + 64 * 1024  # and HEADs
        assert (work_a / meta.digest_hex).is_file()  # the complete blob stays for next time

        # "a" again, now seeding from its complete work dir; "b" gets it from "a" alone
        # (a seeder was seen, so the tracker names no origin fetcher).
        out_a.unlink()
        seeding = trio.Event()
        results: dict[str, subprocess.CompletedProcess[bytes]] = {}

        async def seeder() -> None:
            args = common("fetch-a", work_a)
            results["a"] = await cli(
                "fetch", layer.digest, *args, "-o", str(out_a), "--seed-for", "10"
            )
            seeding.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(seeder)
            with trio.fail_after(30):
                while not out_a.exists():  # in place before the seeding starts
                    await trio.sleep(0.05)
                while await tracker_seeders(cluster.tracker_url) < 1:  # "a" announced
                    await trio.sleep(0.05)
            egress_before = cluster.registry_egress
            out_b = tmp_path / "b.bin"
            proc = await cli(
                "fetch", layer.digest, *common("fetch-b", tmp_path / "work-b"), "-o", str(out_b)
            )
            assert proc.returncode == 0, proc.stderr.decode()
            assert out_b.read_bytes() == layer.data
            assert f"{len(layer.data)} from peers, 0 from the registry" in proc.stderr.decode()
            assert cluster.registry_egress - egress_before < 64 * 1024  # HEADs only
            assert not seeding.is_set()  # "a" is still there, seeding
        proc = results["a"]
        assert proc.returncode == 0, proc.stderr.decode()
        summary = proc.stderr.decode()
        assert (
            f"({len(layer.data)} from the work dir, 0 from peers, 0 from the registry;" in summary
        )
        uploaded = int(summary.split("; ")[1].split()[0])
        assert uploaded >= len(layer.data)


@pytest.mark.parametrize(
    ("daemon", "env"),
    [
        ("tracker", {"P2PIMAGE_TRACKER_OPEN_MODE": "true"}),
        ("node", {"P2PIMAGE_NODE_LISTEN": "127.0.0.1:0"}),  # the busy one: metrics_listen
    ],
)
async def test_a_daemon_on_a_busy_port_says_so_in_one_line(
    tmp_path: Path, daemon: str, env: dict[str, str]
) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        key = "P2PIMAGE_TRACKER_LISTEN" if daemon == "tracker" else "P2PIMAGE_NODE_METRICS_LISTEN"
        environ = {
            **{k: v for k, v in os.environ.items() if not k.startswith("P2PIMAGE_")},
            **env,
            key: address,
            "P2PIMAGE_NODE_CACHE_DIR": str(tmp_path / "cache"),
        }
        with trio.fail_after(30):
            proc = await trio.run_process(
                [sys.executable, "-m", "daemons.cli", daemon],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=environ,
            )
    assert proc.returncode == 1
    stderr = proc.stderr.decode()
    assert "Traceback" not in stderr
    assert f"Error: cannot listen on {address}: Address already in use" in stderr
