"""The openpi websocket policy protocol (`openpi_client.websocket_client_policy.WebsocketClientPolicy`), served by
vlacache: `vlacache serve CONFIG --protocol openpi --port 8000`.

Protocol, as openpi's own server speaks it:
  * on connect the server sends one binary frame: its metadata (msgpack).
  * each binary frame from the client is an observation dict (msgpack, numpy arrays as openpi's msgpack_numpy
    encodes them); the server answers with one binary frame {"actions": float32 [chunk, 7], "server_timing":
    {"infer_ms": ...}, "vlacache": {step, reuse_ratio, reused_per_layer}}.
  * an error is answered with the traceback as a TEXT frame, then the connection closes with code 1011 (the
    client raises RuntimeError with that text).
  * control frames: a client that marks episodes sends `{"__ctrl__": "episode_start", "__experiment__": ...,
    "__task__": ..., "__episode_id__": ...}` and `{"__ctrl__": "episode_end", "__success__": ...}` (the only openpi
    client code that sends them is an unmerged openpi pull request, #919; the released openpi-client 0.1.2 sends
    none); each is answered with `{"__ack__": "episode_start" | "episode_end"}`, an unknown one with
    `{"__ack__": "ignored"}`, and no inference runs. An episode start makes the next observation start a new
    episode; an episode end frees the episode's K/V.
Observation keys (openpi's LIBERO example): `observation/image` (-> 'primary'), `observation/wrist_image`
(-> 'wrist'), `observation/state` (8-d), `prompt`. Each connection is one client, its episodes in turn: a new
episode starts at the connection's first observation, after an episode-start frame, when the prompt changes, or
when the observation carries `"new_episode": True` (openpi-client 0.1.2's `reset()` sends nothing, and its
observations carry no step counter, so nothing else can tell episodes of one task apart).
Arrays arrive as openpi's msgpack_numpy encodes them; only bool / integer / float dtypes with a buffer of exactly
the shape's size are accepted (anything else is refused naming the key, before numpy reads the bytes).
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
    raise ImportError("the openpi protocol needs websockets and msgpack: pip install websockets msgpack (or, from the "
                      f"vlacache clone's root: pip install -e '.[serve]'); {error}") from None

logger = logging.getLogger(__name__)

# openpi's observation keys -> vlacache's cameras.
OPENPI_CAMERAS = {"observation/image": "primary", "observation/wrist_image": "wrist"}
NEW_EPISODE_KEY = "new_episode"
CONTROL_KEY = "__ctrl__"


def _pack_array(obj: Any) -> Any:
    """openpi's msgpack_numpy encoding of numpy arrays and scalars (bytes keys)."""
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in ("V", "O", "c"):
        raise ValueError(f"cannot send numpy dtype {obj.dtype} over the openpi protocol")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


class BadArray:
    """What an ndarray / numpy scalar frame that cannot be trusted decodes to; `check_arrays` names its key."""

    def __init__(self, problem: str) -> None:
        self.problem = problem


ARRAY_KINDS = "biuf"  # bool, signed / unsigned integer, float: what an observation holds


def _unpack_array(obj: dict) -> Any:
    if b"__ndarray__" in obj or b"__npgeneric__" in obj:
        try:
            return _decode_array(obj)
        except (TypeError, ValueError, KeyError, OverflowError) as error:
            return BadArray(str(error))
    return obj


def _decode_array(obj: dict) -> Any:
    dtype = np.dtype(obj[b"dtype"])
    if dtype.kind not in ARRAY_KINDS or dtype.hasobject:
        raise ValueError(f"dtype {dtype.str!r} is not a bool, integer or float dtype")
    if b"__npgeneric__" in obj:
        return dtype.type(obj[b"data"])
    shape, data = obj[b"shape"], obj[b"data"]
    if not isinstance(shape, (list, tuple)) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ValueError(f"shape {shape!r} is not a list of non-negative integers")
    if not isinstance(data, bytes) or len(data) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        size = len(data) if isinstance(data, bytes) else type(data).__name__
        raise ValueError(f"its buffer holds {size} bytes, but shape {list(shape)} of {dtype.str} needs "
                         f"{int(np.prod(shape, dtype=np.int64)) * dtype.itemsize}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def check_arrays(value: Any, where: str = "the message") -> None:
    """Refuse a decoded message holding an array that could not be trusted, naming its key."""
    if isinstance(value, BadArray):
        raise InputError(f"{where}: {value.problem}; send numpy arrays of bool, integer or float dtype "
                         "(openpi_client.msgpack_numpy encodes them)")
    if isinstance(value, Mapping):
        for key, item in value.items():
            check_arrays(item, f"'{key.decode() if isinstance(key, bytes) else key}'")
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_arrays(item, where)


packb = functools.partial(msgpack.packb, default=_pack_array)
unpackb = functools.partial(msgpack.unpackb, object_hook=_unpack_array)


class OpenPISession:
    """One client connection: its own episode in the service, restarted by a new prompt or `new_episode`."""

    def __init__(self, service: PolicyService) -> None:
        self.service = service
        self.id = f"openpi-{uuid.uuid4().hex[:12]}"
        self.prompt: str | None = None
        self.starts_episode = True  # the next observation begins a new episode

    def control(self, frame: Mapping[str, Any]) -> dict[str, str]:
        """An episode-start / episode-end control frame: the acknowledgement to send back."""
        kind = frame[CONTROL_KEY]
        if kind in ("episode_start", "episode_end"):
            if kind == "episode_end":
                self.service.end_session(self.id)
            self.starts_episode = True
        else:
            logger.warning("openpi session %s: ignored the unknown control frame %r", self.id, kind)
            return {"__ack__": "ignored"}
        return {"__ack__": kind}

    def infer(self, obs: Any) -> dict[str, Any]:
        if not isinstance(obs, Mapping):
            raise InputError(f"an openpi observation is a dict (observation/image, prompt, ...), got {type(obs).__name__}")
        prompt = obs.get("prompt")
        if self.starts_episode or obs.get(NEW_EPISODE_KEY) or prompt != self.prompt:
            self.service.start_episode(self.id)
        self.prompt, self.starts_episode = prompt, False
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
                check_arrays(obs)
                if isinstance(obs, Mapping) and CONTROL_KEY in obs:
                    await connection.send(packb(session.control(obs)))
                    continue
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
        print(f"vlacache: serving {service.config.name} over the openpi protocol on ws://{host}:{bound}, "
              f"{service.threads}", flush=True)

    try:
        asyncio.run(serve_forever(service, host, port, announce))
    except KeyboardInterrupt:
        pass
