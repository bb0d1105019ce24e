"""The openpi websocket policy protocol (`openpi_client.websocket_client_policy.WebsocketClientPolicy`), served by
vlacache: `vlacache serve CONFIG --protocol openpi --port 8000`.

Protocol, as openpi's own server speaks it:
  * on connect the server sends one binary frame: its metadata (msgpack).
  * each binary frame from the client is an observation dict (msgpack, numpy arrays as openpi's msgpack_numpy
    encodes them); the server answers with one binary frame {"actions": float32 [chunk, 7], "server_timing":
    {"infer_ms": ...}, "vlacache": {step, reuse_ratio, reused_per_layer}}.
  * an error is answered with the traceback as a TEXT frame, then the connection closes with code 1011 (the
    client raises RuntimeError with that text).
Observation keys (openpi's LIBERO example): `observation/image` (-> 'primary'), `observation/wrist_image`
(-> 'wrist'), `observation/state` (8-d), `prompt`. Each connection is one client, its episodes in turn: a new
episode starts at the connection's first observation, when the prompt changes, or when the observation carries
`"new_episode": True` (openpi's client has no reset message; its `reset()` sends nothing).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import traceback
import uuid
from typing import Any, Mapping

import numpy as np

from vlacache.integrations.service import PolicyService
from vlacache.types import InputError

try:
    import msgpack
    from websockets.asyncio.server import serve as websocket_serve
    from websockets.exceptions import ConnectionClosed
    from websockets.frames import CloseCode
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError(f"the openpi protocol needs websockets and msgpack: pip install 'vlacache[serve]'; {error}") from None

logger = logging.getLogger(__name__)

# openpi's observation keys -> vlacache's cameras.
OPENPI_CAMERAS = {"observation/image": "primary", "observation/wrist_image": "wrist"}
NEW_EPISODE_KEY = "new_episode"


def _pack_array(obj: Any) -> Any:
    """openpi's msgpack_numpy encoding of numpy arrays and scalars (bytes keys)."""
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in ("V", "O", "c"):
        raise ValueError(f"cannot send numpy dtype {obj.dtype} over the openpi protocol")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def _unpack_array(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        return np.ndarray(buffer=obj[b"data"], dtype=np.dtype(obj[b"dtype"]), shape=obj[b"shape"])
    if b"__npgeneric__" in obj:
        return np.dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj


packb = functools.partial(msgpack.packb, default=_pack_array)
unpackb = functools.partial(msgpack.unpackb, object_hook=_unpack_array)


class OpenPISession:
    """One client connection: its own episode in the service, restarted by a new prompt or `new_episode`."""

    def __init__(self, service: PolicyService) -> None:
        self.service = service
        self.id = f"openpi-{uuid.uuid4().hex[:12]}"
        self.prompt: str | None = None

    def infer(self, obs: Any) -> dict[str, Any]:
        if not isinstance(obs, Mapping):
            raise InputError(f"an openpi observation is a dict (observation/image, prompt, ...), got {type(obs).__name__}")
        prompt = obs.get("prompt")
        if obs.get(NEW_EPISODE_KEY) or prompt != self.prompt:
            self.service.start_episode(self.id)
        self.prompt = prompt
        images = {key: value for key, value in obs.items() if isinstance(value, np.ndarray) and value.ndim == 3}
        observation = self.service.observation(images, prompt, obs.get("observation/state"))
        start = time.perf_counter()
        actions, result = self.service.predict(self.id, observation)
        stats = result.stats
        return {"actions": actions, "server_timing": {"infer_ms": 1000 * (time.perf_counter() - start)},
                "vlacache": {"step": stats.step, "reuse_ratio": stats.reuse_ratio,
                             "reused_per_layer": list(stats.reused_per_layer)}}


def metadata(service: PolicyService) -> dict[str, Any]:
    """The first frame a client gets (openpi: `get_server_metadata()`)."""
    config = service.config
    return {"server": "vlacache", "name": config.name, "policy": str(config.policy), "benchmark": config.benchmark,
            "cameras": {name: camera for name, camera in service.cameras.items()},
            "action_chunk": service.chunk, "needs_state": service.backbone.uses_proprio,
            "new_episode_key": NEW_EPISODE_KEY}


async def handle(service: PolicyService, connection) -> None:
    session = OpenPISession(service)
    await connection.send(packb(metadata(service)))
    try:
        async for message in connection:
            try:
                if isinstance(message, str):
                    raise InputError("the openpi protocol sends observations as binary msgpack frames, got a text frame")
                obs = unpackb(message)
                reply = await asyncio.to_thread(session.infer, obs)
                await connection.send(packb(reply))
            except ConnectionClosed:
                raise
            except Exception:
                logger.exception("openpi session %s: inference failed", session.id)
                await connection.send(traceback.format_exc())
                await connection.close(CloseCode.INTERNAL_ERROR, "Internal server error")
                return
    except ConnectionClosed:
        pass
    finally:
        service.end_session(session.id)


async def serve_forever(service: PolicyService, host: str, port: int, ready=None) -> None:
    """Serve until cancelled; `ready(port)` is called once the socket listens (port 0 picks a free one)."""
    async with websocket_serve(functools.partial(handle, service), host, port, compression=None, max_size=None) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        if ready is not None:
            ready(bound)
        await server.serve_forever()


def serve(service: PolicyService, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Block serving the openpi protocol on ws://host:port."""

    def announce(bound: int) -> None:
        print(f"vlacache: serving {service.config.name} over the openpi protocol on ws://{host}:{bound}", flush=True)

    try:
        asyncio.run(serve_forever(service, host, port, announce))
    except KeyboardInterrupt:
        pass
