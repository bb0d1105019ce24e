"""Serving vlacache to evaluation stacks: vla-eval's own orchestrator and client, `vla-eval serve`, the
real openpi client from its own venv, and the shared per-session episode state."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")  # vla-eval's LIBERO benchmark renders in this process

from vlacache import InputError  # noqa: E402
from vlacache.config import ConfigError  # noqa: E402
from vlacache.integrations.service import PolicyService, load_serve_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OPENPI_PYTHON = REPO / ".venvs" / "openpi-client" / "bin" / "python"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end_group(process: subprocess.Popen) -> None:
    """End a server started with start_new_session=True and every process it started (its whole group)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def wait_listening(port: int, process: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}:\n{process.stdout.read()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s")


def tiny_service(backbone, policy="static_reuse"):
    config = load_serve_config({"backbone": {"name": "openvla", "preset": "tiny"}, "policy": policy, "benchmark": "raw"})
    return PolicyService(config, backbone=backbone, default_cameras={"agentview": "primary"})


@pytest.fixture(scope="module")
def cogact_episode_noise():
    """CogACT carries its own episode state: a noise generator drawn once per query and the action ensemble."""
    from vlacache.backbones.cogact import build_preset

    backbone = build_preset("tiny", seed=0, noise="episode", action_ensemble=True)
    assert backbone.ensembler is not None
    return backbone


def episode_streams(frames):
    """Two clients' episodes: different frame orders (and so different caches)."""
    images = [f.images["primary"] for f in frames]
    return {"a": images, "b": images[::-1]}, frames[0].instruction


def separate_runs(backbone, streams, instruction):
    """Each stream's first actions per step, its episode run alone on a fresh service."""
    service = tiny_service(backbone)
    try:
        alone = {}
        for name, images in streams.items():
            service.start_episode(name)
            alone[name] = [service.predict(name, service.observation({"agentview": im}, instruction))[0][0] for im in images]
    finally:
        service.close()
    return alone


# -- the shared service ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["tiny", "cogact_episode_noise"])
def test_interleaved_sessions_equal_separate_runs(model, frames, request):
    """Two clients stepping in turn on one model get exactly what each gets alone, reuse included (CogACT: its
    noise draws and action ensemble too)."""
    streams, instruction = episode_streams(frames)
    service = tiny_service(request.getfixturevalue(model))
    try:
        alone = {}
        for name, images in streams.items():
            service.start_episode(name)
            alone[name] = [service.predict(name, service.observation({"agentview": im}, instruction)) for im in images]
        for name in streams:
            service.start_episode(name)
        together = {name: [] for name in streams}
        for t in range(len(frames)):
            for name, images in streams.items():
                together[name].append(service.predict(name, service.observation({"agentview": images[t]}, instruction)))
    finally:
        service.close()
    for name in streams:
        for (a, ra), (b, rb) in zip(alone[name], together[name]):
            assert np.array_equal(a, b)
            assert ra.stats.reused_per_layer == rb.stats.reused_per_layer
            assert torch_equal(ra.logits, rb.logits)
        assert alone[name][0][1].stats.reuse_ratio == 0 and alone[name][0][1].stats.episode_reset
        assert any(r.stats.reuse_ratio > 0 for _, r in alone[name][1:]), "static reuse must reuse on similar frames"


def test_sessions_batched_together_equal_separate_runs(tiny, frames):
    """predict_many runs the sessions that can share a forward as one batch of episodes: each gets the actions
    of its separate run, a session starting a new episode mid-way included, and one whose prompt has another
    length runs on its own."""
    from test_batched_episodes import other_instruction

    images = [f.images["primary"] for f in frames]
    instruction = frames[0].instruction
    same_length = other_instruction(tiny, instruction)
    longer = instruction + " and then stop"
    assert len(tiny.prompt_ids(longer)) != len(tiny.prompt_ids(instruction))
    plan = {"a": (images, instruction), "b": (images[::-1], same_length), "c": (images, longer)}
    restart_b_at = 3
    alone = {}
    service = tiny_service(tiny)
    try:
        for name, (stream, text) in plan.items():
            service.start_episode(name)
            alone[name] = []
            for t, image in enumerate(stream):
                if name == "b" and t == restart_b_at:
                    service.start_episode(name)
                alone[name].append(service.predict(name, service.observation({"agentview": image}, text))[0])
        names = list(plan)
        for name in names:
            service.start_episode(name)
        together = {name: [] for name in names}
        for t in range(len(images)):
            if t == restart_b_at:
                service.start_episode("b")
            observations = [service.observation({"agentview": plan[n][0][t]}, plan[n][1]) for n in names]
            for name, actions in zip(names, service.predict_many(names, observations)):
                together[name].append(actions)
        records = list(service.records)[-3 * len(images):]
    finally:
        service.close()
    for name in names:
        np.testing.assert_allclose(np.stack(together[name]), np.stack(alone[name]), atol=1e-5)
    batched = [r for r in records if r["batch"] == 2]
    assert {r["session"] for r in batched} == {"a", "b"} and all(r["batch"] == 1 for r in records if r["session"] == "c")
    b_steps = [r["step"] for r in records if r["session"] == "b"]
    assert b_steps == [0, 1, 2, 0, 1, 2] and [r["reuse_ratio"] > 0 for r in records if r["session"] == "b"].count(False) == 2
    assert any(r["reuse_ratio"] > 0 for r in batched)


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_start_episode_gives_a_full_forward(tiny, frames):
    service = tiny_service(tiny)
    try:
        obs = service.observation({"agentview": frames[0].images["primary"]}, frames[0].instruction)
        service.predict("s", obs)
        assert service.predict("s", obs)[1].stats.reuse_ratio > 0
        service.start_episode("s")
        assert service.predict("s", obs)[1].stats.reuse_ratio == 0
        assert [r["episode"] for r in service.records] == [0, 0, 1]
    finally:
        service.close()


def test_bad_client_input_names_the_fix(tiny, frames):
    service = tiny_service(tiny)
    try:
        with pytest.raises(InputError, match="needs camera.*'agentview'"):
            service.observation({"front": frames[0].images["primary"]}, "pick up the bowl")
        with pytest.raises(InputError, match="no task instruction"):
            service.observation({"agentview": frames[0].images["primary"]}, None)
    finally:
        service.close()
    with pytest.raises(ConfigError, match="benchmark must be one of"):
        load_serve_config("micro_oft_libero", ["benchmark=bridge"])
    with pytest.raises(ConfigError, match="not a camera of this backbone"):
        PolicyService(load_serve_config({"backbone": {"name": "openvla", "preset": "tiny"}, "cameras": {"x": "wrist"}}),
                      backbone=tiny)
    assert not any(layer._forward_pre_hooks for layer in tiny.decoder.layers)  # a refused service leaves no hooks


def test_client_actions_follow_the_benchmark_convention():
    from vlacache.integrations.service import to_client_actions

    model = np.array([[0.1, 0.2, 0.3, 0.0, 0.0, 0.5, 1.0], [0.1, 0.2, 0.3, 0.0, 0.0, 0.5, 0.0]], np.float32)
    libero = to_client_actions(model, "libero")
    assert libero[:, 6].tolist() == [-1.0, 1.0]  # 1 = open -> LIBERO's -1 (open); 0 -> +1 (close)
    simpler = to_client_actions(model, "simpler")
    assert simpler[:, 6].tolist() == [1.0, -1.0] and np.allclose(simpler[0, 3:6], [0, 0, 0.5], atol=1e-6)
    assert np.array_equal(to_client_actions(model, "raw"), model)


# -- vla-eval ----------------------------------------------------------------------------------------------------
@pytest.mark.sim
def test_vla_eval_orchestrator_runs_libero_episodes():
    """vla-eval's own orchestrator (api.evaluate, in process) drives the shipped OFT micro-policy with VLA-Cache
    over 2 short LIBERO episodes: chunks of 8 played out by vla-eval, a full first query per episode, reuse after."""
    import vla_eval.api

    from vlacache.integrations.vla_eval import VlaCacheModelServer

    server = VlaCacheModelServer("micro_oft_libero")
    config = {"benchmarks": [{"benchmark": "vla_eval.benchmarks.libero.benchmark:LIBEROBenchmark",
                              "episodes_per_task": 2, "max_tasks": 1, "max_steps": 24,
                              "params": {"suite": "libero_spatial", "seed": 7}}]}
    try:
        results = vla_eval.api.evaluate(server, config, docker=False, no_save=True)
    finally:
        server.service.close()
    (result,) = results
    assert result["num_errors"] == 0
    params = dict(result["server_info"]["observation_params"])
    served = params.pop("vlacache")  # the result file names what was served
    assert params == {"send_wrist_image": True, "send_state": True, "quat_no_antipodal": True}
    assert served["policy"] == "vla-cache" and served["name"] == "micro_oft_libero"
    assert served["backbone"]["checkpoint"] == "micro_oft_libero_spatial" and "EntropyAdaptive" in served["policy_config"]
    assert [e["queries"] for e in server.episodes] == [3, 3] and all(e["reuse_ratio"] > 0 for e in server.episodes)
    assert all(e["flops_mean"] > 0 and e["latency_ms_mean"] > 0 for e in server.episodes)
    episodes = result["tasks"][0]["episodes"]
    assert len(episodes) == 2 and all(e["steps"] == 24 for e in episodes)
    records = list(server.service.records)
    assert [(r["episode"], r["step"]) for r in records] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert len({r["session"] for r in records}) == 1
    for r in records:
        assert (r["reuse_ratio"] > 0) == (r["step"] > 0), r


@pytest.mark.parametrize("max_batch_size", [1, 2])
def test_vla_eval_sessions_never_share_a_cache(tiny, frames, max_batch_size):
    """Two vla-eval clients (its own Connection class) on one served model each get the actions of a separate
    run: stepping in turn (max_batch_size 1), or concurrently, their queries batched (max_batch_size 2)."""
    from vla_eval.api import serve_background
    from vla_eval.connection import Connection

    from vlacache.integrations.vla_eval import VlaCacheModelServer

    streams, instruction = episode_streams(frames)
    alone = separate_runs(tiny, streams, instruction)

    service = tiny_service(tiny)
    together = {name: [] for name in streams}

    async def clients(url):
        connections = {name: Connection(url, timeout=120) for name in streams}
        for connection in connections.values():
            await connection.connect()
            await connection.start_episode({"task": "t"})
        async def step(name, connection, t):
            action = await connection.act({"images": {"agentview": streams[name][t]}, "task_description": instruction})
            together[name].append(np.asarray(action["actions"]))

        for t in range(len(frames)):
            if max_batch_size == 1:
                for name, connection in connections.items():
                    await step(name, connection, t)
            else:
                async with anyio.create_task_group() as group:
                    for name, connection in connections.items():
                        group.start_soon(step, name, connection, t)
        for connection in connections.values():
            await connection.end_episode({"success": False})
            await connection.close()

    try:
        with serve_background(VlaCacheModelServer.for_service(service, max_batch_size=max_batch_size)) as handle:
            anyio.run(clients, handle.url)
    finally:
        service.close()
    assert len({r["session"] for r in service.records}) == 2
    for name in streams:
        np.testing.assert_allclose(np.stack(together[name]), np.stack(alone[name]), atol=1e-5)



def test_a_bad_observation_fails_its_own_session_not_the_batch_it_would_join(tiny, frames):
    """max_batch_size 2, vla-eval clients (its own Connection) querying together, 5 times: the one whose images
    are NaN gets an error, the healthy one its actions every time (it failed when the two formed one batch)."""
    from vla_eval.api import serve_background
    from vla_eval.connection import Connection

    from vlacache.integrations.vla_eval import VlaCacheModelServer

    service = tiny_service(tiny)
    good_image = frames[0].images["primary"]
    bad_image = np.full(good_image.shape, np.nan, np.float32)
    outcome = {"good": [], "bad": [], "primer": []}

    async def clients(url):
        async def query(name, image):
            async with Connection(url, timeout=120) as connection:
                await connection.connect()
                await connection.start_episode({"task": "t"})
                try:
                    action = await connection.act({"images": {"agentview": image}, "task_description": "pick up the bowl"})
                    outcome[name].append(np.asarray(action["actions"]).shape)
                except Exception as error:  # vla-eval's client raises on the server's ERROR reply
                    outcome[name].append(str(error))

        async def after_the_primer(name, image):
            await anyio.sleep(0.02)  # while the primer's query runs: the two arrive together and form one batch
            await query(name, image)

        for _ in range(5):
            async with anyio.create_task_group() as group:
                group.start_soon(query, "primer", good_image)
                group.start_soon(after_the_primer, "good", good_image)
                group.start_soon(after_the_primer, "bad", bad_image)

    try:
        with serve_background(VlaCacheModelServer.for_service(service, max_batch_size=2)) as handle:
            anyio.run(clients, handle.url)
    finally:
        service.close()
    assert outcome["good"] == [(7,)] * 5, outcome["good"]
    assert len(outcome["bad"]) == 5 and all("NaN or inf" in str(e) for e in outcome["bad"]), outcome["bad"]


def test_vla_eval_batch_of_sessions_equals_separate_runs(tiny, frames):
    """What vla-eval's dispatcher calls with max_batch_size > 1: predict_batch over several sessions' queries."""
    from vla_eval.model_servers.base import SessionContext

    from vlacache.integrations.vla_eval import VlaCacheModelServer

    streams, instruction = episode_streams(frames)
    alone = separate_runs(tiny, streams, instruction)
    service = tiny_service(tiny)
    server = VlaCacheModelServer.for_service(service, max_batch_size=2)
    contexts = [SessionContext(session_id=name, episode_id="0") for name in streams]
    try:
        replies = [server.predict_batch([{"images": {"agentview": streams[c.session_id][t]}, "task_description": instruction}
                                         for c in contexts], contexts) for t in range(len(frames))]
    finally:
        service.close()
    for i, name in enumerate(streams):
        np.testing.assert_allclose(np.stack([r[i]["actions"] for r in replies]), np.stack(alone[name]), atol=1e-5)
    assert all(r["batch"] == 2 for r in service.records) and any(r["reuse_ratio"] > 0 for r in service.records)


@pytest.mark.parametrize("launcher", ["python -m", "vlacache serve", "vla-eval serve"])
def test_vla_eval_server_starts_from_the_command_line(launcher):
    """`python -m vlacache.integrations.vla_eval`, `vlacache serve --protocol vla-eval --max-batch-size 2` and
    vla-eval's own `vla-eval serve` (uv run, its default port replaced by --address) all serve the micro-policy;
    vla-eval's client gets the HELLO and a chunk of LIBERO-convention actions."""
    from vla_eval.connection import Connection

    port = free_port()
    if launcher == "python -m":
        command = [sys.executable, "-m", "vlacache.integrations.vla_eval", "micro_oft_libero", "policy=no_cache",
                   "--port", str(port)]
    elif launcher == "vlacache serve":
        command = [str(BIN / "vlacache"), "serve", "micro_oft_libero", "policy=no_cache", "--protocol", "vla-eval",
                   "--port", str(port), "--max-batch-size", "2"]
    else:
        command = [str(BIN / "vla-eval"), "serve", "-c", "configs/vla_eval/serve_micro_oft_libero.yaml",
                   "--address", f"127.0.0.1:{port}"]
    env = {**os.environ, "UV_NO_PROJECT": "1", "UV_OFFLINE": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # `vla-eval serve` starts the server as a child (uv run)
    rng = np.random.default_rng(0)
    obs = {"images": {"agentview": rng.integers(0, 255, (256, 256, 3), dtype=np.uint8),
                      "wrist": rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)},
           "states": np.zeros(8, np.float32), "task_description": "pick up the black bowl and place it on the plate"}
    replies = {}

    async def client():
        async with Connection(f"ws://127.0.0.1:{port}", timeout=120) as connection:
            await connection.connect()
            replies["hello"] = connection.server_info
            await connection.start_episode({"task": "t"})
            replies["action"] = (await connection.act(obs))["actions"]

    try:
        wait_listening(port, process)
        anyio.run(client)
    finally:
        end_group(process)
    assert replies["hello"]["model_server"] == "VlaCacheModelServer"
    action = np.asarray(replies["action"])
    assert action.shape == (7,) and np.isfinite(action).all() and action[6] in (-1.0, 1.0)


# -- openpi --------------------------------------------------------------------------------------------------------
OPENPI_CLIENT = r"""
import json, sys
import numpy as np
from openpi_client import msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy

client = WebsocketClientPolicy("127.0.0.1", int(sys.argv[1]))
rng = np.random.default_rng(0)
agent = rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)
wrist = rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)
def obs(prompt, **extra):
    return {"observation/image": agent, "observation/wrist_image": wrist, "observation/state": np.zeros(8, np.float32),
            "prompt": prompt, **extra}
out = {"metadata": client.get_server_metadata(), "steps": []}
for o in [obs("pick up the black bowl"), obs("pick up the black bowl"), obs("pick up the black bowl", new_episode=True),
          obs("pick up the black bowl"), obs("put the bowl on the plate")]:
    reply = client.infer(o)
    out["steps"].append({"shape": list(reply["actions"].shape), "dtype": str(reply["actions"].dtype),
                         "gripper": reply["actions"][:, 6].tolist(), "reuse": reply["vlacache"]["reuse_ratio"],
                         "infer_ms": reply["server_timing"]["infer_ms"]})
# the control frames of openpi's episode-marking client (openpi PR #919: `episode_start` / `episode_end` send
# these frames with the client's own packer and read one reply), around two more queries of the last prompt
def control(frame):
    client._ws.send(client._packer.pack(frame))
    return msgpack_numpy.unpackb(client._ws.recv())
start = {"__ctrl__": "episode_start", "__experiment__": "libero", "__task__": "t", "__episode_id__": 3}
out["acks"] = [control(start)]
for o in [obs("put the bowl on the plate"), obs("put the bowl on the plate")]:
    reuse = client.infer(o)["vlacache"]["reuse_ratio"]
    out["steps"].append({"shape": [8, 7], "dtype": "float32", "gripper": [1.0], "reuse": reuse})
out["acks"] += [control({"__ctrl__": "episode_end", "__success__": True}), control({"__ctrl__": "pause"})]
try:
    client.infer({"observation/image": agent, "prompt": "pick up the black bowl"})
    out["error"] = None
except RuntimeError as error:
    out["error"] = str(error)
print(json.dumps(out))
"""


def openpi_client_run(tmp_path, overrides: list[str], client: str) -> dict:
    """`vlacache serve micro_oft_libero --protocol openpi OVERRIDES` answering the real openpi-client (its own
    venv: numpy<2) running the script `client`; returns what the script printed (JSON)."""
    assert OPENPI_PYTHON.exists(), "the openpi client venv is missing: run bash scripts/setup_openpi_client.sh (setup.sh does)"
    port = free_port()
    process = subprocess.Popen([str(BIN / "vlacache"), "serve", "micro_oft_libero", "--protocol", "openpi",
                                "--port", str(port), *overrides],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    script = tmp_path / "client.py"
    script.write_text(client)
    try:
        wait_listening(port, process)
        run = subprocess.run([str(OPENPI_PYTHON), str(script), str(port)], capture_output=True, text=True, timeout=300)
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_openpi_protocol_with_the_real_client(tmp_path):
    """`vlacache serve --protocol openpi` answered by the real openpi-client: metadata, action chunks, a new
    episode on `new_episode` or a new prompt, and errors as the protocol's text frame."""
    log = tmp_path / "queries.jsonl"
    out = openpi_client_run(tmp_path, ["policy=static_reuse", f"log={log}"], OPENPI_CLIENT)
    assert out["metadata"]["server"] == "vlacache" and out["metadata"]["action_chunk"] == 8
    steps = out["steps"]
    assert all(s["shape"] == [8, 7] and s["dtype"] == "float32" for s in steps)
    assert all(set(s["gripper"]) <= {-1.0, 1.0} for s in steps)
    assert [s["reuse"] > 0 for s in steps] == [False, True, False, True, False, False, True]
    assert out["acks"] == [{"__ack__": "episode_start"}, {"__ack__": "episode_end"}, {"__ack__": "ignored"}]
    assert "needs camera(s) ['wrist']" in out["error"] and "observation/wrist_image" in out["error"]
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["episode"] for r in logged] == [0, 0, 1, 1, 2, 3, 3]  # the episode-start frame began episode 3


def test_a_crafted_array_is_refused_naming_its_key_and_the_server_serves_the_next_client(tmp_path):
    """An ndarray frame with an object dtype over raw bytes (it crashed the server: numpy read the bytes as
    pointers), or a buffer that does not fit its shape, is answered with an error naming the key; the server
    process stays up and the next client is served."""
    import msgpack
    from websockets.sync.client import connect

    from vlacache.integrations.openpi import packb, unpackb

    port = free_port()
    process = subprocess.Popen([str(BIN / "vlacache"), "serve", "micro_oft_libero", "--protocol", "openpi",
                                "--port", str(port), "policy=no_cache"], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    image = np.zeros((128, 128, 3), np.uint8)
    good = {"observation/image": image, "observation/wrist_image": image, "observation/state": np.zeros(8, np.float32),
            "prompt": "pick up the black bowl"}
    crafted = [({b"__ndarray__": True, b"data": b"\x01" * 64, b"dtype": "|O", b"shape": [8]}, "dtype '|O'"),
               ({b"__ndarray__": True, b"data": b"\x00" * 4, b"dtype": "<f4", b"shape": [8]}, "holds 4 bytes")]
    try:
        wait_listening(port, process)
        for array, problem in crafted:
            with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None) as ws:
                ws.recv()  # metadata
                message = msgpack.packb({**{k: v for k, v in good.items() if k != "observation/state"},
                                         "observation/state": array}, default=lambda o: {
                                             b"__ndarray__": True, b"data": o.tobytes(), b"dtype": o.dtype.str,
                                             b"shape": o.shape})
                ws.send(message)
                error = ws.recv()
            assert isinstance(error, str) and "'observation/state'" in error and problem in error, error
            assert process.poll() is None
        with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None) as ws:
            ws.recv()
            ws.send(packb(good))
            reply = unpackb(ws.recv())
        assert reply["actions"].shape == (8, 7) and process.poll() is None
    finally:
        end_group(process)


def test_serve_refuses_a_bad_config_before_listening():
    out = subprocess.run([str(BIN / "vlacache"), "serve", "micro_oft_libero", "benchmark=bridge"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "benchmark must be one of" in out.stderr


def test_a_serve_config_sets_the_servers_torch_threads():
    import torch

    before = torch.get_num_threads()
    try:
        service = PolicyService(load_serve_config({"backbone": {"name": "openvla", "preset": "tiny"}, "threads": 1}))
        assert torch.get_num_threads() == 1 and "1 torch thread per process (threads=1" in service.threads
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="threads must be a positive integer"):
        load_serve_config({"backbone": {"name": "openvla", "preset": "tiny"}, "threads": 0})


def test_frames_of_another_size_than_the_policy_was_trained_on_get_one_warning(tiny, capsys):
    config = load_serve_config({"backbone": {"name": "openvla", "preset": "tiny"}, "benchmark": "raw",
                                "trained_image_size": 128})
    service = PolicyService(config, backbone=tiny, default_cameras={"agentview": "primary"})
    try:
        for size in (128, 256, 256, 224):
            service.observation({"agentview": np.zeros((size, size, 3), np.uint8)}, "pick up the bowl")
    finally:
        service.close()
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "{'primary': [256, 256]} px frames" in err and "BENCHMARKS.md" in err


def test_check_lerobot_never_picks_a_python312_that_does_not_run(tmp_path):
    """A pyenv-style `python3.12` shim first on PATH that fails when run is skipped: the script runs each
    candidate, then falls back to pyenv's versions folder (or says Python 3.12 is needed)."""
    shim = tmp_path / "python3.12"
    shim.write_text("#!/bin/sh\necho 'pyenv: python3.12: command not found' >&2\nexit 127\n")
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "RESOLVE_ONLY": "1"}
    env.pop("PYTHON312", None)
    out = subprocess.run(["bash", str(REPO / "scripts" / "check_lerobot.sh")], capture_output=True, text=True, env=env,
                         timeout=60)
    if out.returncode == 0:
        chosen = out.stdout.strip().removeprefix("python3.12: ")
        assert chosen != str(shim)
        version = subprocess.run([chosen, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
        assert version.stdout.strip() == "(3, 12)"
    else:
        assert "LeRobot needs Python 3.12" in out.stderr


def test_a_stacks_device_flag_places_the_backbone_unless_an_override_does():
    from vlacache.integrations.service import with_device

    assert with_device(["execute_chunk=4"], "cuda") == ["execute_chunk=4", "backbone.device=cuda"]
    assert with_device(["backbone.device=cpu"], "cuda") == ["backbone.device=cpu"]
    assert with_device([], None) == [] and with_device([], "") == []
    config = load_serve_config("micro_oft_libero", with_device([], "cpu"))
    assert resolve_backbone_device(config) == "cpu"


def resolve_backbone_device(config):
    from vlacache.experiment import resolve_backbone_spec

    return dict(resolve_backbone_spec(config.backbone))["device"]


OPENPI_PI0_CLIENT = r"""
import json, sys
import numpy as np
from openpi_client.websocket_client_policy import WebsocketClientPolicy

client = WebsocketClientPolicy("127.0.0.1", int(sys.argv[1]))
rng = np.random.default_rng(0)
agent = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
wrist = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
out = []
for _ in range(2):
    reply = client.infer({"observation/image": agent, "observation/wrist_image": wrist, "prompt": "pick up the bowl",
                          "observation/state": np.linspace(-0.5, 0.5, 8).astype(np.float32)})
    out.append({"shape": list(reply["actions"].shape), "reuse": reply["vlacache"]["reuse_ratio"],
                "first": reply["actions"][0].tolist()})
print(json.dumps(out))
"""


def test_pi0_is_served_over_the_openpi_protocol_to_the_real_client(tmp_path):
    """π0 (its tiny preset) behind `vlacache serve --protocol openpi`, the protocol of its own stack, with the
    model's actions as they are (`benchmark=raw`): a whole chunk per query, static reuse from the second query."""
    steps = openpi_client_run(tmp_path, ["backbone={name: pi0, preset: tiny, noise: fixed}", "policy=static_reuse",
                                         "benchmark=raw", "execute_chunk=null", "trained_image_size=null"],
                              OPENPI_PI0_CLIENT)
    assert [s["shape"] for s in steps] == [[10, 7], [10, 7]]  # the tiny preset's chunk of 10
    assert steps[0]["reuse"] == 0 and steps[1]["reuse"] > 0
    assert np.allclose(steps[0]["first"], steps[1]["first"], atol=1e-4)  # same frame, fixed noise: same actions
