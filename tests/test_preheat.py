"""Preheat (issue #14 item 5): the tracker's job board, its endpoints, the node's poll
loop and ``p2pimage preheat``, with the real registry, sidecar, tracker, nodes and skopeo."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from daemons.cli.preheat import PreheatFailed, submit_preheat, wait_preheat
from daemons.testbed.localcluster import LocalCluster, local_cluster
from p2pimage.oci.image import build_image, push_image
from p2pimage.oci.registry import RegistryClient
from p2pimage.tracker import (
    PreheatBoard,
    PreheatError,
    PreheatLayer,
    PreheatPoll,
    PreheatReport,
    PreheatSpec,
    parse_preheat_poll,
    parse_preheat_report,
    parse_preheat_request,
)
from p2pimage.tracker._preheat import PreheatBoardFull

MIB = 1024 * 1024
DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64

requires_registry = pytest.mark.skipif(
    shutil.which("docker-registry") is None,
    reason="docker-registry (Debian package docker-registry) is not installed",
)


# --- the board (pure) -----------------------------------------------------------------


def spec(nodes: str | None = None) -> PreheatSpec:
    return PreheatSpec("team/app", (PreheatLayer(DIGEST_A, 10),), nodes)


def test_jobs_are_handed_to_selected_nodes_of_their_cluster_until_they_report() -> None:
    board = PreheatBoard("e1", ttl_s=100)
    first = board.submit("c1", spec(), "ci", now=0)
    second = board.submit("c1", spec("node-[01],gpu-*"), "ci", now=1)
    board.submit("c2", spec(), "ci", now=1)
    assert [j.id for j in board.pending("c1", "node-0", 0, now=2)] == [first.id, second.id]
    assert [j.id for j in board.pending("c1", "node-2", 0, now=2)] == [first.id]
    assert [j.id for j in board.pending("c1", "gpu-7", first.id, now=2)] == [second.id]
    board.report("c1", "node-0", PreheatReport(first.id, "done"), now=3)
    board.report("c1", "node-1", PreheatReport(first.id, "failed", "403"), now=3)
    assert [j.id for j in board.pending("c1", "node-0", 0, now=3)] == [second.id]
    assert (first.count("done"), first.count("failed"), first.errors) == (1, 1, {"node-1": "403"})
    assert board.stats(now=3) == (3, 1, 1)
    # A node reports only on jobs of its own cluster that select it.
    with pytest.raises(PreheatError, match="no live preheat job"):
        board.report("c2", "node-0", PreheatReport(second.id, "done"), now=3)
    with pytest.raises(PreheatError, match="does not select"):
        board.report("c1", "node-2", PreheatReport(second.id, "done"), now=3)
    # Jobs expire after their lifetime.
    assert board.pending("c1", "node-2", 0, now=100.5) == []
    assert board.stats(now=200) == (0, 0, 0)


def test_a_cluster_has_a_bounded_number_of_live_jobs() -> None:
    board = PreheatBoard("e1", ttl_s=10, max_jobs=2)
    board.submit("c1", spec(), "ci", now=0)
    board.submit("c1", spec(), "ci", now=0)
    with pytest.raises(PreheatBoardFull):
        board.submit("c1", spec(), "ci", now=1)
    board.submit("c2", spec(), "ci", now=1)  # other clusters are not affected
    board.submit("c1", spec(), "ci", now=11)  # the first two expired


def test_requests_are_validated() -> None:
    body = {
        "repository": "team/app",
        "layers": [{"digest": DIGEST_A, "size": 3}, {"digest": DIGEST_A, "size": 3}],
        "nodes": "node-*",
        "image": "reg:5000/team/app:v1",
    }
    parsed = parse_preheat_request(json.dumps(body).encode())
    assert parsed.layers == (PreheatLayer(DIGEST_A, 3),)  # duplicates once
    assert parsed.selects("node-3") and not parsed.selects("gpu-1")
    for bad, message in [
        ({**body, "repository": "Team/App"}, "repository"),
        ({**body, "layers": []}, "layers"),
        ({**body, "layers": [{"digest": "sha256:xyz", "size": 1}]}, "digest"),
        ({**body, "layers": [{"digest": DIGEST_B, "size": -1}]}, "size"),
        ({**body, "layers": [{"digest": DIGEST_B, "size": True}]}, "size"),
        ({**body, "nodes": "a b"}, "nodes"),
    ]:
        with pytest.raises(PreheatError, match=message):
            parse_preheat_request(json.dumps(bad).encode())
    assert parse_preheat_report(b'{"job": 3, "result": "done"}') == PreheatReport(3, "done")
    with pytest.raises(PreheatError, match="result"):
        parse_preheat_report(b'{"job": 3, "result": "maybe"}')
    with pytest.raises(PreheatError, match="nests too deeply"):
        parse_preheat_request(b'{"layers": ' + b"[" * 60_000 + b"]" * 60_000 + b"}")
    with pytest.raises(PreheatError, match="exceeds"):
        parse_preheat_request(b" " * (200 * 1024))


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
_keys = st.sampled_from(
    ["repository", "layers", "nodes", "image", "job", "result", "error", "epoch", "cursor", "jobs"]
)


@given(
    st.binary(max_size=300)
    | st.dictionaries(_keys, _json_values).map(lambda d: json.dumps(d).encode())
)
def test_garbage_never_raises_anything_but_preheat_error(body: bytes) -> None:
    for parse in (parse_preheat_request, parse_preheat_report, parse_preheat_poll):
        try:
            parsed = parse(body)
        except PreheatError:
            continue
        assert isinstance(parsed, PreheatSpec | PreheatReport | PreheatPoll)


def test_the_poll_answer_round_trips_what_the_board_hands_out() -> None:
    board = PreheatBoard("e1")
    job = board.submit("c1", spec("node-*"), "ci", now=0)
    answer = {"epoch": "e1", "cursor": board.cursor(), "jobs": [job.to_json(progress=False)]}
    parsed = parse_preheat_poll(json.dumps(answer).encode())
    assert parsed == PreheatPoll("e1", job.id, ((job.id, spec("node-*")),))
    answer["jobs"] = [{**job.to_json(progress=False), "layers": [{"digest": "../x"}]}]
    with pytest.raises(PreheatError, match="digest"):
        parse_preheat_poll(json.dumps(answer).encode())


def test_image_references_name_their_registry() -> None:
    import click

    from daemons.cli.preheat import parse_image

    assert parse_image("reg.example:5000/team/app:v1") == ("reg.example:5000", "team/app", "v1")
    assert parse_image("localhost/app") == ("localhost", "app", "latest")
    assert parse_image(f"127.0.0.1:5000/app@{DIGEST_A}") == ("127.0.0.1:5000", "app", DIGEST_A)
    for bad in ("team/app:v1", "app", "reg:5000/", "reg:5000/App", "reg:5000/app:v 1"):
        with pytest.raises(click.BadParameter):
            parse_image(bad)


# --- the daemons ----------------------------------------------------------------------


async def push(cluster: LocalCluster, sizes: list[int], seed: int) -> tuple[str, int, int]:
    """Push a fresh image; (manifest digest, layer bytes, config bytes)."""
    image = build_image(sizes, seed=seed)
    async with RegistryClient(cluster.registry.url) as client:
        digest = await push_image(client, "demo/app", "v1", image)
    return digest, sum(len(la.data) for la in image.layers), len(image.config.data)


def credential_file(cluster: LocalCluster, tmp_path: Path) -> Path:
    path = tmp_path / "credential"
    path.write_text(cluster.credential)
    return path


async def run_cli(*args: str) -> trio.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "daemons.cli", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


@requires_registry
async def test_unauthenticated_preheats_are_refused_and_bad_images_fail_clearly(
    tmp_path: Path,
) -> None:
    async with local_cluster(tmp_path / "c", nodes=1, preheat_poll_s=0.5) as cluster:
        base = cluster.tracker_url.removesuffix("/announce")
        body = {"repository": "demo/app", "layers": [{"digest": DIGEST_A, "size": 1}]}
        async with httpx.AsyncClient(timeout=10) as http:
            bare = await http.post(f"{base}/preheat", json=body)
            bearer = await http.post(
                f"{base}/preheat", json=body, headers={"Authorization": "Bearer x.y.z"}
            )
            poll = await http.get(f"{base}/preheat", params={"since": 0})
        assert bare.status_code == 401 and "DPoP" in bare.json()["error"]
        assert bare.headers["www-authenticate"].startswith("DPoP")
        assert bearer.status_code == 401 and bearer.json()["reason"] == "dpop_required"
        assert poll.status_code == 401
        assert cluster.nodes[0].daemon is not None
        # An image that does not exist: one clear line, exit 1, nothing submitted.
        cred = credential_file(cluster, tmp_path)
        common = ["--tracker", cluster.tracker_url, "--sidecar", cluster.sidecar_url]
        common += ["--credential-file", str(cred), "--plain-http"]
        with trio.fail_after(60):
            missing = await run_cli("preheat", f"{cluster.registry_host}/demo/nothing:v1", *common)
            bad_ref = await run_cli("preheat", "no-registry-here", *common)
        err = missing.stderr.decode()
        assert missing.returncode == 1, err
        assert err.startswith("Error: cannot resolve") and "demo/nothing" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert bad_ref.returncode == 2 and "HOST[:PORT]/REPOSITORY" in bad_ref.stderr.decode()
        # A well-formed job for a blob the registry does not have: the node reports the
        # failure, keeps serving, and the tracker shows it.
        async with httpx.AsyncClient(timeout=10) as http:
            await push(cluster, [2 * MIB, 500], seed=40)
            job, auth = await submit_preheat(
                registry_url=cluster.registry.url,
                image="demo/app:v1",
                repository="demo/app",
                reference="v1",
                tracker_url=cluster.tracker_url,
                sidecar_url=cluster.sidecar_url,
                credential=cluster.credential,
                nodes="node-0",
                http=http,
            )
            with pytest.raises(PreheatFailed, match="the credential belongs to cluster"):
                await submit_preheat(
                    registry_url=cluster.registry.url,
                    image="demo/app:v1",
                    repository="demo/app",
                    reference="v1",
                    tracker_url=cluster.tracker_url,
                    sidecar_url=cluster.sidecar_url,
                    credential=cluster.credential,
                    cluster="elsewhere",
                    http=http,
                )
            # Bad input from an authenticated caller: 4xx with a reason, never a 5xx.
            for method, path, kwargs, status in [
                ("GET", "/preheat", {"params": {"since": "²"}}, 400),
                ("GET", "/preheat", {"params": {"since": "-1"}}, 400),
                ("GET", "/preheat/²", {}, 404),
                ("GET", "/preheat/99999999999999999999999", {}, 404),
                ("POST", "/preheat", {"content": b"{not json"}, 400),
                ("POST", "/preheat", {"content": b"[" * 60_000}, 400),
                ("POST", "/preheat", {"content": b" " * (200 * 1024)}, 413),
                ("POST", "/preheat/report", {"json": {"job": 12345, "result": "done"}}, 400),
            ]:
                r = await http.request(method, f"{base}{path}", auth=auth, **kwargs)
                assert r.status_code == status, (path, r.status_code, r.text)
                assert r.json()["error"]
            forged = {"repository": "demo/app", "layers": [{"digest": DIGEST_B, "size": 9}]}
            r = await http.post(f"{base}/preheat", json=forged, auth=auth)
            assert r.status_code == 201
            with trio.fail_after(30):
                done = await wait_preheat(
                    tracker_url=cluster.tracker_url,
                    job_id=int(job["id"]),
                    auth=auth,
                    expect_nodes=1,
                    timeout_s=30,
                    http=http,
                )
                failed = await wait_preheat(
                    tracker_url=cluster.tracker_url,
                    job_id=int(r.json()["job"]["id"]),
                    auth=auth,
                    expect_nodes=1,
                    timeout_s=30,
                    http=http,
                )
            assert done["results"] == {"node-0": "done"}
            # The 500-byte layer is below the swarm threshold: pulls read it from the
            # registry anyway, so the preheat leaves it alone.
            node = cluster.nodes[0].daemon
            assert node is not None
            assert node.preheat_layers["done"] == 1 and node.preheat_layers["small"] == 1
            assert failed["results"] == {"node-0": "failed"}
            assert "404" in failed["errors"]["node-0"]
            health = await http.get(f"{cluster.nodes[0].mirror_url}/healthz")
            assert health.status_code == 200
        status = await run_cli("status", "--tracker", base, "--json")
        report = json.loads(status.stdout)
        assert report["preheat_jobs"] == 2
        assert report["preheat_nodes"] == {"done": 1, "failed": 1}


@requires_registry
async def test_preheat_then_skopeo_pulls_read_no_layer_from_the_registry(
    tmp_path: Path, skopeo_available: None
) -> None:
    from p2pimage.mirror.runtime_config import write_registries_conf
    from tests.runtimes import askopeo_copy

    nodes = 3
    async with local_cluster(tmp_path / "c", nodes=nodes, preheat_poll_s=0.5) as cluster:
        pushed, layer_bytes, config_bytes = await push(cluster, [6 * MIB, 3 * MIB], seed=41)
        cred = credential_file(cluster, tmp_path)
        before = cluster.registry_egress
        with trio.fail_after(120):
            result = await run_cli(
                "preheat",
                f"{cluster.registry_host}/demo/app:v1",
                "--registry-url",
                cluster.registry.url,
                "--tracker",
                cluster.tracker_url,
                "--sidecar",
                cluster.sidecar_url,
                "--credential-file",
                str(cred),
                "--wait",
                "90",
                "--expect-nodes",
                str(nodes),
                "--json",
            )
        assert result.returncode == 0, result.stderr.decode()
        job = json.loads(result.stdout)
        assert job["nodes_done"] == nodes and job["nodes_failed"] == 0
        preheat_egress = cluster.registry_egress - before
        # Origin ranges: about one copy of the layers for the whole cluster (HTTP
        # headers and the access checks' HEADs on top).
        assert preheat_egress <= 1.05 * layer_bytes + 64 * 1024, preheat_egress / layer_bytes
        daemons = [n.daemon for n in cluster.nodes]
        assert all(d is not None and d.preheat_layers["done"] == 2 for d in daemons)
        origin0 = [d.layers.origin_bytes() for d in daemons if d is not None]
        registry0 = [d.layers.stats.bytes_served["registry"] for d in daemons if d is not None]

        digests: dict[int, str] = {}

        async def pull(i: int) -> None:
            conf = write_registries_conf(
                tmp_path / f"reg{i}.conf", cluster.registry_host, cluster.nodes[i].mirror_host
            )
            digests[i] = await askopeo_copy(
                f"{cluster.registry_host}/demo/app:v1", tmp_path / f"out{i}", conf
            )

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for i in range(nodes):
                    nursery.start_soon(pull, i)
        assert digests == dict.fromkeys(range(nodes), pushed)
        for i, daemon in enumerate(daemons):
            assert daemon is not None
            stats = daemon.layers.stats
            # Every layer from the node's cache; no origin read, and from the registry
            # only the config blob (below the swarm threshold, always passed through).
            assert stats.bytes_served["cache"] >= layer_bytes
            assert daemon.layers.origin_bytes() - origin0[i] == 0
            assert stats.bytes_served["registry"] - registry0[i] <= config_bytes
            assert not stats.fallbacks


@requires_registry
def test_cluster_command_preheats_then_pulls_without_registry_layer_bytes(
    tmp_path: Path, skopeo_available: None
) -> None:
    import subprocess

    out = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemons.cli",
            "cluster",
            "--nodes",
            "3",
            "--layers",
            "3,2",
            "--registry-mib-s",
            "16",
            "--no-direct",
            "--preheat",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    report = json.loads(out.read_text())
    assert report["digests_ok"] is True and report["client"] == "skopeo"
    assert report["preheat_nodes_done"] == 3
    assert 0.9 <= report["preheat_registry_copies"] <= 1.05
    assert report["pull_registry_bytes"] == 0
    # The pulls read layers from the nodes' caches: nothing between peers, and the
    # registry sent only manifests, the config blob and headers.
    assert report["peer_mib"] == 0
    assert report["pull_registry_total_bytes"] < 64 * 1024
    assert "pulls after it: layer bytes from the registry" in proc.stdout


@requires_registry
async def test_private_images_are_preheated_with_the_nodes_own_credentials_only(
    tmp_path: Path,
) -> None:
    import base64

    login = ("alice", "s3cret")
    async with local_cluster(
        tmp_path / "c", nodes=2, htpasswd=login, preheat_poll_s=0.5, preheat_auth=login
    ) as cluster:
        image = build_image([2 * MIB], seed=42)
        layer = image.layers[0]
        async with RegistryClient(cluster.registry.url, username=login[0], password=login[1]) as c:
            await push_image(c, "private/app", "v1", image)
        node0, node1 = (n.daemon for n in cluster.nodes)
        assert node0 is not None and node1 is not None
        node1.settings.preheat_registry_auth_file = None  # node-1 has no registry login
        async with httpx.AsyncClient(timeout=30) as http:
            job, auth = await submit_preheat(
                registry_url=cluster.registry.url,
                image="private/app:v1",
                repository="private/app",
                reference="v1",
                tracker_url=cluster.tracker_url,
                sidecar_url=cluster.sidecar_url,
                credential=cluster.credential,
                username=login[0],
                password=login[1],
                http=http,
            )
            assert "password" not in json.dumps(job) and "s3cret" not in json.dumps(job)
            with trio.fail_after(60):
                job = await wait_preheat(
                    tracker_url=cluster.tracker_url,
                    job_id=int(job["id"]),
                    auth=auth,
                    expect_nodes=2,
                    timeout_s=60,
                    http=http,
                )
            assert job["results"] == {"node-0": "done", "node-1": "failed"}
            assert "401" in job["errors"]["node-1"]
            assert node1.preheat_layers == {"denied": 1}
            assert node1.layers.stats.bytes_served["swarm"] == 0
            # The preheated layer is in node-0's cache, and still only for clients the
            # registry lets read it: the runtime's own credentials are checked as before.
            url = f"{cluster.nodes[0].mirror_url}/v2/private/app/blobs/{layer.digest}"
            ns = {"ns": cluster.registry_host}
            anonymous = await http.get(url, params=ns)
            assert anonymous.status_code == 401
            wrong = "Basic " + base64.b64encode(b"alice:wrong").decode()
            assert (
                await http.get(url, params=ns, headers={"Authorization": wrong})
            ).status_code == 401
            served = node0.layers.stats.bytes_served["cache"]
            basic = "Basic " + base64.b64encode(b"alice:s3cret").decode()
            allowed = await http.get(url, params=ns, headers={"Authorization": basic})
            assert allowed.status_code == 200 and allowed.content == layer.data
            assert node0.layers.stats.bytes_served["cache"] - served == len(layer.data)
