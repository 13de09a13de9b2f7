"""Issue 19 (2): the deploy topology. nginx runs the file docs/DEPLOYMENT.md shows; a drain behind it resumes
every session on the other instance with no row lost (bench/topology.py does it with three gateway
processes, Redis Sentinel and PostgreSQL under load)."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from deploy.processes import NGINX_CONF, Nginx
from tests.conftest import unique_user
from tests.live import LiveServer, VoiceClient, text_turn
from voice.models import VoiceSession

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENT = ROOT / "docs" / "DEPLOYMENT.md"
needs_nginx = pytest.mark.skipif(Nginx.binary() is None, reason="nginx is not installed (apt-get install nginx-light)")


def test_the_deployment_guide_shows_the_nginx_file_that_runs() -> None:
    text = DEPLOYMENT.read_text()
    shown = re.search(r"`deploy/nginx/intelia-voice\.conf`:\n\n```nginx\n(.*?)```\n", text, re.S)
    assert shown, "docs/DEPLOYMENT.md §2 must show deploy/nginx/intelia-voice.conf"
    assert shown.group(1) == NGINX_CONF.read_text()


def test_compose_runs_the_same_topology() -> None:
    """No Docker daemon here: the file is checked for what deploy/topology.py also starts."""
    compose = (ROOT / "deploy" / "compose.yaml").read_text()
    assert "./nginx/intelia-voice.conf:/etc/nginx/conf.d/intelia-voice.conf" in compose
    for service in ("redis-master", "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3", "postgres",
                    "engine", "migrate", "gateway-1", "gateway-2", "gateway-3", "nginx"):
        assert re.search(rf"^  {service}:", compose, re.M), service
    assert "REDIS_SENTINELS: sentinel-1:26379,sentinel-2:26379,sentinel-3:26379" in compose
    assert "realtime_engine" in compose and "OPENAI_REALTIME_URL: ws://engine:8765/v1/realtime" in compose
    upstreams = (ROOT / "deploy" / "nginx" / "compose" / "upstream-servers.conf").read_text()
    assert [f"gateway-{k}:8000" for k in (1, 2, 3)] == re.findall(r"server (\S+) ", upstreams)


@needs_nginx
def test_nginx_accepts_the_configuration(tmp_path) -> None:
    checked = Nginx(tmp_path, [8001, 8002]).check()
    assert checked.returncode == 0, checked.stderr


@needs_nginx
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed (a test certificate)")
def test_the_guides_production_site_files_pass_nginx_t(tmp_path) -> None:
    """§2's upstream-servers.conf and site.conf (TLS, HTTP/2) with the shared file, a throwaway certificate."""
    example = re.search(r"## 2\. Load balancer.*?```nginx\n(.*?)```\n", DEPLOYMENT.read_text(), re.S).group(1)
    parts = dict(re.findall(r"# /etc/nginx/intelia-voice/(\S+): [^\n]*\n(.*?)(?=\n# |\Z)", example, re.S))
    assert set(parts) == {"upstream-servers.conf", "site.conf"}
    cert, key = tmp_path / "voice.crt", tmp_path / "voice.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=voice.example.com", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    site = (parts["site.conf"].replace("/etc/ssl/voice.example.com.crt", str(cert))
            .replace("/etc/ssl/voice.example.com.key", str(key))
            .replace("/var/log/nginx/voice.access.log", str(tmp_path / "access.log")))
    checked = Nginx(tmp_path / "nginx", [], site=site, upstream_servers=parts["upstream-servers.conf"]).check()
    assert checked.returncode == 0, checked.stderr


async def _live_session_ids() -> list[str]:
    from voice.realtime.registry import live_sessions

    return [consumer.session_id for consumer in live_sessions()]


@needs_nginx
@pytest.mark.django_db(transaction=True)
async def test_drain_behind_nginx_resumes_every_session_on_the_other_instance(live_db, token_for, tmp_path):
    servers = [LiveServer().start(), LiveServer().start()]
    nginx = Nginx(tmp_path / "nginx", [server.port for server in servers]).start()
    url = f"ws://127.0.0.1:{nginx.port}/v1/ws/voice"
    stopping = None
    try:
        users = [unique_user(f"topo{i}") for i in range(6)]
        clients, ids = [], []
        for user in users:  # one after another: nginx's least_conn spreads them over both instances
            client = await VoiceClient.open(url, token=token_for(user))
            ids.append((await client.wait_for("gateway.session.ready", timeout=20))["session_id"])
            clients.append(client)
        await asyncio.gather(*(text_turn(c) for c in clients))
        on_drained = set(servers[0].call(_live_session_ids()))
        assert 0 < len(on_drained) < len(ids)

        stopping = asyncio.create_task(asyncio.to_thread(servers[0].stop))  # SIGTERM-like: the drain
        for k, (user, session_id) in enumerate(zip(users, ids, strict=True)):
            if session_id not in on_drained:
                continue
            notice = await clients[k].wait_for("gateway.session.draining", timeout=15)
            assert await clients[k].wait_closed(10) == 4012
            for _attempt in range(50):  # nginx may still pick the draining instance once: it refuses, retry
                resumed = await VoiceClient.open(url, token=token_for(user), query=f"resume={notice['resume_token']}")
                event = await resumed.next_event(20)
                while event["type"] not in ("gateway.session.ready", "gateway.error"):
                    event = await resumed.next_event(20)
                if event["type"] == "gateway.session.ready":
                    break
                await resumed.wait_closed(5)
                await asyncio.sleep(0.2)
            assert event["session_id"] == session_id and event["resumed"] is True
            clients[k] = resumed
        await stopping
        assert set(servers[1].call(_live_session_ids())) == set(ids)  # all on the remaining instance
        await asyncio.gather(*(text_turn(c) for c in clients))
        for client in clients:
            await client.close()

        for _ in range(100):
            rows = [r async for r in VoiceSession.objects.filter(pk__in=ids, end_reason="client_closed")]
            if len(rows) == len(ids):
                break
            await asyncio.sleep(0.1)
        assert len(rows) == len(ids)  # zero rows lost
        assert {str(r.pk): r.connections for r in rows} == {i: 2 if i in on_drained else 1 for i in ids}
        assert all(r.turns == 2 for r in rows)
        access_log = (tmp_path / "nginx" / "logs" / "voice.access.log").read_text()
        assert "/v1/ws/voice" in access_log and "resume=" not in access_log and "token=" not in access_log
    finally:
        if stopping is not None:
            await stopping
        nginx.stop()
        for server in servers:
            server.stop()
